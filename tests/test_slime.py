"""SliME (spec llava15_slime_llavar.md §C): slicing on the spec's worked examples; the gated mixture of adapters, the
local compressor, the spatial merge and the text-guided router against PyTorch references written here from the
spec, with weights converted by our SliME name tables."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from uhd_jax.convert import tables
from uhd_jax.data.slicing import slime_grid, slime_grid_candidates, slime_tiles
from uhd_jax.models.projectors import slime as S
from uhd_jax.train.param_tree import flatten, unflatten

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- slicing (§C.1)

@pytest.mark.parametrize("size, grid", [
    ((2048, 512), (5, 1)),     # spec: 5x1, 1344 px of content centred in 1680
    ((1000, 1000), (2, 3)),    # spec: square images pick 2x3 (cols x rows) = 672x1008 over 3x2 (first on ties)
    ((640, 480), (2, 2)),      # spec: 640x480 -> P = 4
    ((336, 336), (1, 2)),      # spec: a <= 336^2 image -> P = 2
    ((200, 300), (1, 2)),
    ((3000, 2000), (3, 2)),    # n clamped to 6: among 5..7 tiles, 3x2 keeps the most resolution
])
def test_slime_grid_on_the_spec_examples(size, grid):
    assert slime_grid(*size) == grid


def test_slime_candidates_follow_the_area_rule():
    # n = ceil(W*H / 336^2) clamped to 2..6; m in {n, n+1} for n <= 2, else {n-1, n, n+1}; cols = 1..m dividing m
    assert slime_grid_candidates(336, 336) == [(1, 2), (2, 1), (1, 3), (3, 1)]
    assert {c * r for c, r in slime_grid_candidates(4000, 4000)} == {5, 6, 7}
    assert slime_grid_candidates(640, 480)[:2] == [(1, 2), (2, 1)]


def test_slime_tiles_letterbox_on_black_and_distorted_global_view():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(30, 255, size=(512, 2048, 3), dtype=np.uint8))
    global_view, tiles, grid = slime_tiles(img)
    assert grid == (5, 1) and len(tiles) == 5 and all(t.size == (336, 336) for t in tiles)
    canvas = np.concatenate([np.asarray(t) for t in tiles], axis=1)                   # (336, 1680, 3)
    content = (canvas.max(axis=(0, 2)) > 0)
    # 2048x512 scaled by 336/512 -> 1344 wide, pasted at (1680 - 1344) // 2 = 168
    assert not content[:168].any() and not content[1512:].any() and content[168:1512].all()
    np.testing.assert_array_equal(np.asarray(global_view),
                                  np.asarray(img.resize((336, 336), Image.Resampling.BICUBIC)))
    # row-major tiles of a 2x2 grid
    _, tiles, grid = slime_tiles(Image.fromarray(rng.integers(30, 255, size=(480, 640, 3), dtype=np.uint8)))
    assert grid == (2, 2)
    assert np.asarray(tiles[1])[100, 0].any() and not np.asarray(tiles[0])[0, 0].any()  # top letterbox band


# ---------------------------------------------------------------- torch references (§C.2-C.4)

def torch_sincos(grid: int, dim: int) -> torch.Tensor:
    """Row-major tokens; first D/2 channels the column index, last D/2 the row, each [sin(p w_k), cos(p w_k)]."""
    w = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def emb(p):
        a = p.reshape(-1, 1).double() * w[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([emb(cols), emb(rows)], dim=1).float()


class TorchQueryResampler(torch.nn.Module):
    def __init__(self, grid, dim, heads):
        super().__init__()
        self.grid = grid
        self.query = torch.nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        self.pos_embed = torch.nn.Parameter(torch_sincos(grid, dim), requires_grad=False)
        self.attn = torch.nn.MultiheadAttention(dim, heads)
        self.ln_q, self.ln_kv, self.ln_post = (torch.nn.LayerNorm(dim, eps=1e-6) for _ in range(3))

    def forward(self, x):                                       # (N, S*S, D)
        n, length, d = x.shape
        s = int(math.isqrt(length))
        pos_k = self.pos_embed
        if s != self.grid:
            t = self.pos_embed.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
            pos_k = F.interpolate(t, size=(s, s), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
            pos_k = pos_k.reshape(s * s, d)
        kv = self.ln_kv(x)
        q = (self.ln_q(self.query) + self.pos_embed)[:, None].expand(-1, n, -1)
        out = self.attn(q, (kv + pos_k).permute(1, 0, 2), kv.permute(1, 0, 2), need_weights=False)[0]
        return self.ln_post(out.permute(1, 0, 2))


class TorchGatedBlock(torch.nn.Module):
    def __init__(self, dv, hidden, heads, expert=-1):
        super().__init__()
        self.expert = expert
        self.projection = torch.nn.Sequential(torch.nn.Linear(dv, hidden), torch.nn.GELU(),
                                              torch.nn.Linear(hidden, hidden))
        self.attn = TorchQueryResampler(24, dv, heads)
        self.w_gate = torch.nn.Parameter(torch.zeros(dv, 2))
        self.w_noise = torch.nn.Parameter(torch.zeros(dv, 2))

    def forward(self, x):
        if x.shape[0] != 576 and x.shape[1] != 576:
            return self.projection(x)
        if self.expert == 0:
            return self.projection(x)
        if self.expert == 1:
            return self.projection(self.attn(x))
        gates = torch.softmax(x @ self.w_gate, dim=-1)
        top, idx = gates.topk(2, dim=-1)
        gates = torch.zeros_like(gates).scatter(-1, idx, top / (top.sum(-1, keepdim=True) + 1e-6))
        return gates[..., 0:1] * self.projection(x) + gates[..., 1:2] * self.projection(self.attn(x))


def torch_router(local, text, topp, temperature=1.0):
    """Kept indices (original order) of one sample's local tokens; `text` already without image slots/padding."""
    scores = F.cosine_similarity(local[:, None, :], text[None, :, :], dim=-1).sum(-1)
    probs = torch.softmax(scores / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, descending=True)
    k = int((torch.cumsum(sorted_p, dim=-1) <= topp).sum())
    if k < len(probs):
        k += 1
    return sorted(order[:k].tolist())


def randomise(module: torch.nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pos_embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("ln_q.weight") else 0.0))


def convert(state: dict, rules, template_params) -> dict:
    """torch state dict -> our tree with our converter's rules and transforms (every tensor used exactly once)."""
    expected = flatten(template_params)
    out = {}
    for key, value in state.items():
        match = [(r, r.match_torch(key)) for r in rules if r.match_torch(key)]
        assert len(match) == 1, (key, match)
        rule, path = match[0]
        out[path] = rule.transform.to_ours(value.detach().numpy(), expected[path].shape)
    assert set(out) == set(expected), set(expected) ^ set(out)
    return unflatten(out)


# ---------------------------------------------------------------- module parity

@pytest.mark.parametrize("grid, size", [(4, 4), (3, 5)])   # same size, and the key table bicubic-resized
def test_query_resampler_matches_torch(grid, size):
    torch.manual_seed(0)
    ref = TorchQueryResampler(grid, 32, 4)
    randomise(ref, 1)
    with torch.no_grad():   # the released checkpoints store the table in fp16: queries and keys use the stored one
        ref.pos_embed.copy_(ref.pos_embed.half().float())
    x = torch.randn(3, size * size, 32)
    ours = S.QueryResampler(grid, 4)
    template = nn.meta.unbox(ours.init(jax.random.PRNGKey(0), jnp.zeros((3, size * size, 32)))["params"])
    rules = tuple(r for r in tables.SLIME_SAMPLER)
    params = convert({"post_qformer." + k: v for k, v in ref.state_dict().items()}, rules,
                     {"sampler": {"post_qformer": template}})["sampler"]["post_qformer"]
    got = ours.apply({"params": params}, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(got), ref(x).detach().numpy(), **TOL)


@pytest.mark.parametrize("expert", [-1, 0, 1])
def test_gated_adapters_match_torch(expert):
    torch.manual_seed(0)
    ref = TorchGatedBlock(32, 48, 4, expert)
    randomise(ref, 2)
    ours = S.GatedAdapters(48, num_heads=4, expert=expert)
    x = torch.randn(2, 576, 32)
    template = nn.meta.unbox(ours.init(jax.random.PRNGKey(0), jnp.zeros((2, 576, 32)))["params"])
    params = convert(ref.state_dict(), tables.SLIME_ADAPTERS, template)
    got = ours.apply({"params": params}, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(got), ref(x).detach().numpy(), **TOL)
    # tiles' compressed tokens (144 per tile) take the MLP alone
    tiles = torch.randn(2, 3, 144, 32)
    np.testing.assert_allclose(np.asarray(ours.apply({"params": params}, jnp.asarray(tiles.numpy()))),
                               ref.projection(tiles).detach().numpy(), **TOL)


def test_gate_noise_only_in_training_and_switchable():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 576, 16))
    noisy = S.GatedAdapters(24, num_heads=2)
    params = noisy.init(jax.random.PRNGKey(1), x)["params"]
    params = dict(params, w_gate=jax.random.normal(jax.random.PRNGKey(2), (16, 2)))
    clean = noisy.apply({"params": params}, x)
    train = noisy.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(np.asarray(train), np.asarray(clean))
    off = S.GatedAdapters(24, num_heads=2, gate_noise=False).apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    np.testing.assert_array_equal(np.asarray(off), np.asarray(clean))


def test_local_compressor_and_spatial_merge_match_torch():
    torch.manual_seed(0)
    ref = TorchQueryResampler(12, 32, 4)
    randomise(ref, 3)
    rows, cols = 2, 3
    tiles = torch.randn(rows * cols, 576, 32)
    ours = S.LocalCompressor(num_heads=4)
    template = nn.meta.unbox(ours.init(jax.random.PRNGKey(0), jnp.zeros((rows * cols, 576, 32)))["params"])
    params = convert({"post_qformer." + k: v for k, v in ref.state_dict().items()}, tables.SLIME_SAMPLER,
                     {"sampler": template})["sampler"]
    got = np.asarray(ours.apply({"params": params}, jnp.asarray(tiles.numpy())))          # (P, 144, 32)
    want = ref(tiles).detach()
    np.testing.assert_allclose(got, want.numpy(), **TOL)
    # 'spatial': view (rows, cols, 12, 12, H) -> permute (rows, 12, cols, 12, H) -> flatten
    merged = want.view(rows, cols, 12, 12, 32).permute(0, 2, 1, 3, 4).reshape(-1, 32)
    np.testing.assert_array_equal(want.numpy().reshape(-1, 32)[S.spatial_order(cols, rows)], merged.numpy())


@pytest.mark.parametrize("topp", [0.95, 0.5, 1.0])
def test_router_keeps_the_same_tokens_as_torch(topp):
    rng = np.random.default_rng(0)
    b, m, length, h = 3, 40, 12, 16
    local = rng.normal(size=(b, m, h)).astype(np.float32)
    text = rng.normal(size=(b, length, h)).astype(np.float32)
    local_valid = np.ones((b, m), bool)
    local_valid[1, 25:] = False                        # a sample with fewer tiles: padded local slots
    text_valid = np.ones((b, length), bool)
    text_valid[0, 3:6] = False                         # image slots removed from the text
    text_valid[2, 9:] = False                          # padding
    keep = np.asarray(S.route_tokens(jnp.asarray(local), jnp.asarray(local_valid), jnp.asarray(text),
                                     jnp.asarray(text_valid), topp=topp))
    for i in range(b):
        n = int(local_valid[i].sum())
        want = torch_router(torch.from_numpy(local[i, :n]), torch.from_numpy(text[i][text_valid[i]]), topp)
        if topp >= 1.0:
            want = list(range(n))
        assert list(np.flatnonzero(keep[i])) == want
    if topp < 1.0:
        assert keep.sum() < local_valid.sum()          # the router does drop tokens at this topp


def test_router_training_noise_changes_the_kept_set():
    rng = np.random.default_rng(1)
    local = jnp.asarray(rng.normal(size=(1, 200, 8)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(1, 6, 8)), jnp.float32)
    args = (local, jnp.ones((1, 200), bool), text, jnp.ones((1, 6), bool))
    clean = np.asarray(S.route_tokens(*args, topp=0.5))
    noisy = np.asarray(S.route_tokens(*args, topp=0.5, noise_key=jax.random.PRNGKey(0)))
    assert (clean != noisy).any()
