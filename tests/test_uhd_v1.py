"""LLaVA-UHD v1: slicing against the spec's worked examples, RoIAlign against a direct re-implementation of
torchvision's kernel, the resamplers against a torch reference written from the spec, packing, conversion."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.torch_helpers import rel_err
from tests.uhd_helpers import convert_state, tiny_uhd, windows_reference
from uhd_jax.convert import tables
from uhd_jax.data.slicing import best_grid, resize_keep_ratio, slice_image
from uhd_jax.data.uhd_images import PackedLayout, fill_row
from uhd_jax.models.projectors.resampler import ResamplerGeometry, SpatialResampler, sincos_2d
from uhd_jax.models.projectors.windows import pooled_size, roi_taps
from uhd_jax.train.checkpoints import load_params
from uhd_jax.train.param_tree import flatten

# ------------------------------------------------------------------------------------------------ slicing


@pytest.mark.parametrize("size, grid, slice_size, overview", [
    ((672, 1088), (2, 3), (322, 336), (252, 420)),
    ((1920, 1080), (3, 2), (364, 308), (448, 252)),
    ((4000, 300), (7, 1), (462, 238), (1218, 84)),
    ((1024, 1024), (3, 2), None, None),          # float64 tie: ln(3/2) wins over |ln(2/3)| by one ulp
    ((1000, 1), None, None, (9996, 14)),         # degenerate: not split, overview upscaled to ~336^2 area
])
def test_slicing_worked_examples(size, grid, slice_size, overview):
    out = slice_image(Image.new("RGB", size, (200, 10, 10)), max_slices=7)
    assert out.grid == grid
    if slice_size:
        assert all(s.size == slice_size for s in out.slices)
    if overview:
        assert out.overview.size == overview


@pytest.mark.parametrize("size", [(100, 100), (336, 336), (500, 2000), (2000, 500), (3000, 3000), (777, 1313),
                                  (1600, 400), (90, 3000), (4096, 2160)])
def test_slicing_invariants(size):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8))
    out = slice_image(img, max_slices=7)
    assert len(out.slices) <= 7
    for im in out.images:
        w, h = im.size
        assert w % 14 == 0 and h % 14 == 0
        if min(size) >= 100 and max(size) / min(size) <= 4:  # ordinary shapes: area near 336^2
            assert 0.75 * 336 ** 2 <= w * h <= 336 ** 2
    if out.grid:
        cols, rows = out.grid
        assert len(out.slices) == cols * rows and len({s.size for s in out.slices}) == 1
        assert out.separators == ([","] * (cols - 1) + ["\n"]) * rows
        # row-major: slice (r, c) is the crop at column c, row r of the one refined resize
        sw, sh = out.slices[0].size
        refined = img.resize((sw * cols, sh * rows), Image.Resampling.BICUBIC)
        r, c = rows - 1, cols - 1
        np.testing.assert_array_equal(np.asarray(out.slices[-1]),
                                      np.asarray(refined.crop((c * sw, r * sh, (c + 1) * sw, (r + 1) * sh))))


def test_never_more_slices_than_allowed_and_resize_keep_ratio():
    for w in range(300, 6000, 97):
        g = best_grid(w, 2000, max_slices=9)
        assert g is None or g[0] * g[1] <= 9
    assert resize_keep_ratio(Image.new("RGB", (5000, 5000)), 1536).size == (1535, 1536)
    assert resize_keep_ratio(Image.new("RGB", (300, 100)), 1024).size == (1024, 341)
    small = Image.new("RGB", (2000, 100))
    assert resize_keep_ratio(small, 1024, upscale_only=True) is small


# ------------------------------------------------------------------------------------------------ RoIAlign


def test_pooled_sizes_follow_the_aspect_ratio():
    assert pooled_size(24, 24) == (3, 3)
    assert pooled_size(12, 24) == (2, 4)   # 2:1 wide
    assert pooled_size(18, 24) == (3, 4)   # 4:3 wide
    assert pooled_size(24, 12) == (4, 2)   # 1:2 tall
    assert pooled_size(1, 714) == (2, 4)


@pytest.mark.parametrize("h, w", [(24, 24), (22, 26), (17, 31), (7, 80), (1, 40), (30, 9), (10, 14), (14, 10), (10, 6)])
def test_roi_taps_equal_torchvision_semantics(h, w):
    fmap = np.random.default_rng(h * 100 + w).normal(size=(5, h, w)).astype(np.float32)
    index, weight, key_valid, (ph, pw) = roi_taps(h, w, 12, max_taps=16)
    flat = fmap.reshape(5, -1).T
    ours = (flat[index] * weight[..., None]).sum(2)[:, :ph * pw]          # (144, ph*pw, C)
    assert key_valid.sum() == ph * pw
    np.testing.assert_allclose(ours, windows_reference(fmap), rtol=1e-6, atol=1e-6)


def test_window_edges_are_the_originals_float64_boxes_cast_once():
    """Every map up to 119 x 119: the edges equal the spec's Python-float boxes cast to float32 once (float32
    arithmetic puts e.g. the 10-row map's last end at 9.999999 instead of 10.0)."""
    from tests.uhd_helpers import window_edges_reference
    from uhd_jax.models.projectors.windows import window_edges

    ref = {n: window_edges_reference(n) for n in range(1, 120)}
    assert ref[10][1][-1] == np.float32(10.0)
    for h in range(1, 120):
        for w in range(1, 120):
            y0, y1, x0, x1 = window_edges(h, w)
            for got, want in zip((y0, y1, x0, x1), ref[h] + ref[w]):
                assert got.dtype == np.float32 and np.array_equal(got, want), (h, w)


@pytest.mark.parametrize("h, w, axis", [(10, 14, 0), (14, 10, 1)])
def test_last_samples_of_a_10_pixel_side_fall_outside_the_map(h, w, axis):
    """10 pixels in 12 windows of 3 pooled bins: a window is 5/6 px, stretched to 1 px, one sample per bin at 1/6,
    1/2 and 5/6 of it. The last window starts at 55/6 = 9.1667, so its third sample sits at 10.0 + float32 rounding,
    beyond the edge: those keys are all-zero (torchvision counts the sample in the mean, contributing 0). The second
    sample (9.67) reads the last row with its full weight."""
    _, weight, _, (ph, pw) = roi_taps(h, w, 12, max_taps=16)
    assert (ph, pw) == ((3, 4) if axis == 0 else (4, 3))
    keys = weight.reshape(12, 12, ph, pw, -1)
    last = keys[11] if axis == 0 else keys[:, 11]                          # (12 windows, ph, pw, taps)
    third = last[:, 2] if axis == 0 else last[:, :, 2]
    second = last[:, 1] if axis == 0 else last[:, :, 1]
    assert np.all(third == 0)
    assert np.all(second.sum(-1) > 0.99)


def test_roi_taps_refuse_shapes_beyond_the_tap_budget():
    with pytest.raises(ValueError, match="max_taps"):
        roi_taps(1, 714, 12, max_taps=4)


# ------------------------------------------------------------------------------------------------ resampler


class TorchResampler(torch.nn.Module):
    """The spec's AdaptSpatialResampler (§2.2) and arXiv Resampler (§2.3), per image, in torch."""

    def __init__(self, d, heads, kv_dim, grid, windowed):
        super().__init__()
        self.grid, self.windowed = grid, windowed
        self.query = torch.nn.Parameter(torch.randn(grid * grid, d) * 0.5)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(grid, d)))
        self.kv_proj = torch.nn.Linear(kv_dim, d, bias=False)
        self.attn = torch.nn.MultiheadAttention(d, heads)
        self.ln_q, self.ln_kv, self.ln_post = (torch.nn.LayerNorm(d, eps=1e-6) for _ in range(3))
        self.proj = torch.nn.Parameter(torch.randn(d, d) * d ** -0.5)
        for p in self.parameters():  # non-trivial LN affine and biases
            if p.ndim == 1:
                p.data.normal_(0.3, 0.2)

    def forward(self, x, h, w):
        d = self.query.shape[1]
        table = self.pos_embed.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        kpos = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)[0].reshape(d, -1).T
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query) + self.pos_embed
        if not self.windowed:
            out = self.attn(q[:, None], (kv + kpos)[:, None], kv[:, None], need_weights=False)[0][:, 0]
        else:
            keys = windows_reference((kv + kpos).T.reshape(d, h, w).detach().numpy(), self.grid)
            vals = windows_reference(kv.T.reshape(d, h, w).detach().numpy(), self.grid)
            k = torch.from_numpy(keys).float().transpose(0, 1)          # (P, windows, D)
            v = torch.from_numpy(vals).float().transpose(0, 1)
            out = self.attn(q[None], k, v, need_weights=False)[0][0]    # one query per window
        return self.ln_post(out) @ self.proj


def packed_inputs(sizes, kv_dim, layout, seed=0):
    """Random per-image feature maps and the packed row holding them (as `encode_packed` would emit)."""
    rng = np.random.default_rng(seed)
    maps = [rng.normal(size=(h * w, kv_dim)).astype(np.float32) for h, w in sizes]
    arrays = layout.zeros(1)
    fill_row(arrays, 0, [np.zeros((14 * h, 14 * w, 3), np.float32) for h, w in sizes], layout)
    feats = rng.normal(size=(1, layout.patch_budget, kv_dim)).astype(np.float32)  # CLS/padding: noise, ignored
    offset = 0
    for m in maps:
        feats[0, offset + 1:offset + 1 + len(m)] = m
        offset += 1 + len(m)
    geom = ResamplerGeometry(*(jnp.asarray(arrays[k]) for k in (
        "key_pos_index", "key_pos_weight", "roi_index", "roi_weight", "key_valid", "image_valid",
        "patch_segment_ids", "patch_is_cls")))
    return maps, jnp.asarray(feats), geom


@pytest.mark.parametrize("windowed, grid, heads", [(True, 12, 4), (False, 8, 2)])
def test_resampler_matches_torch_reference(windowed, grid, heads):
    d, kv_dim = 64, 24
    torch.manual_seed(0)
    ref = TorchResampler(d, heads, kv_dim, grid, windowed).eval()
    sizes = [(24, 24), (22, 26), (7, 80), (10, 14)] if windowed else [(24, 24), (9, 20)]
    layout = PackedLayout(patch_budget=sum(1 + h * w for h, w in sizes) + 5, max_images=len(sizes) + 1,
                          query_grid=grid, windowed=windowed)
    maps, feats, geom = packed_inputs(sizes, kv_dim, layout)
    model = SpatialResampler(embed_dim=d, num_heads=heads, grid=grid, windowed=windowed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), feats, geom)["params"]
    params, _ = convert_state(ref.state_dict(), shapes, tables.RESAMPLER_ORIGINAL)
    out = np.asarray(model.apply({"params": params}, feats, geom))
    assert out.shape == (1, len(sizes) + 1, grid * grid, d)
    with torch.no_grad():
        for k, ((h, w), m) in enumerate(zip(sizes, maps)):
            want = ref(torch.from_numpy(m), h, w).numpy()
            assert rel_err(out[0, k], want) <= 1e-5, (h, w)


# ------------------------------------------------------------------------------------------------ spatial schema


def test_v1_schema_counts_and_order():
    from uhd_jax.models.spatial_schema import image_layout, image_token_count

    assert image_token_count((2, 3)) == 1014 and image_token_count((7, 1)) == 1159
    assert image_token_count((3, 3)) == 145 * 9 + 144 and image_token_count(None) == 144
    ids, rows = image_layout((2, 1), [",", "\n"], separator_ids={",": 7, "\n": 9}, first_row=144)
    assert len(ids) == 145 * 2 + 144
    np.testing.assert_array_equal(rows[:144], np.arange(144, 288))          # slice 0
    assert (ids[144], rows[144]) == (7, -1) and (ids[289], rows[289]) == (9, -1)
    np.testing.assert_array_equal(rows[-144:], np.arange(432, 576))         # overview last


def test_grid_schema_stitches_slices_row_by_row():
    from uhd_jax.models.spatial_schema import image_layout, image_token_count

    assert image_token_count((2, 3), schema="grid") == 1045
    assert image_token_count((3, 3), schema="grid") == 1477 and image_token_count((1, 9), schema="grid") == 1549
    g = 12
    ids, rows = image_layout((2, 3), [",", "\n"] * 3, schema="grid", separator_ids={",": 7, "\n": 9})
    assert len(ids) == 1045
    big = rows[:36 * 25].reshape(36, 25)
    assert (big[:, -1] == -1).all() and (ids[:36 * 25].reshape(36, 25)[:, -1] == 9).all()
    # token (R, C) of the stitched grid is token (R % 12, C % 12) of slice (R // 12, C // 12)
    rr, cc = np.meshgrid(np.arange(36), np.arange(24), indexing="ij")
    want = ((rr // g) * 2 + cc // g) * 144 + (rr % g) * g + cc % g
    np.testing.assert_array_equal(big[:, :24], want)
    assert ids[36 * 25] == 7 and rows[36 * 25] == -1                        # sep_tokens[0], then the overview
    np.testing.assert_array_equal(rows[-144:], np.arange(6 * 144, 7 * 144))


# ------------------------------------------------------------------------------------------------ model + training


def test_packed_images_give_each_images_features_alone(synthetic_data):
    """Slices of several sizes packed into one row: the VLM's image features equal each image encoded alone."""
    from uhd_jax.data.uhd_images import normalize
    from uhd_jax.models.vlm import VLM, init_fn
    from uhd_jax.train.trainer import model_for_stage, packed_layout

    c = tiny_uhd(synthetic_data)
    c.model.vision.max_image_patches = 18   # the 6x3 image: more patches than the tiny tower's 4x4 grid
    cfg = model_for_stage(c, c.stages.sft)
    params = nn.meta.unbox(init_fn(cfg)(jax.random.PRNGKey(3))["params"])
    layout = packed_layout(c, cfg)
    rng = np.random.default_rng(0)
    images = [normalize(Image.fromarray(rng.integers(0, 255, (14 * h, 14 * w, 3), np.uint8)))
              for h, w in [(4, 4), (2, 7), (6, 3), (1, 9)]]
    model = VLM(cfg)
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VLM.encode_images))
    together = layout.zeros(1)
    fill_row(together, 0, images, layout)
    got = np.asarray(enc(params, together))[0].reshape(layout.max_images, 144, -1)
    for k, img in enumerate(images):
        alone = layout.zeros(1)
        fill_row(alone, 0, [img], layout)
        want = np.asarray(enc(params, alone))[0, :144]
        assert rel_err(got[k], want) <= 1e-5, k


def test_uhd_training_compiles_once_and_trains_the_named_parameters(synthetic_data, tmp_path):
    """Images of many aspect ratios (1:4 .. 4:1, 64..320 px), sliced into up to 3 slices + overview: the step
    compiles once per stage; pretraining moves only the resampler (not its fixed sin-cos table), SFT the LLM too."""
    from uhd_jax.data.dataset import read_samples
    from uhd_jax.train.trainer import run

    c = tiny_uhd(synthetic_data)
    ratios = {round(Image.open(os.path.join(synthetic_data["images"], s["image"])).size[0]
                    / Image.open(os.path.join(synthetic_data["images"], s["image"])).size[1], 1)
              for s in read_samples(os.path.join(synthetic_data["root"], "train_sft.json"))}
    assert len(ratios) >= 10
    pre, sft = run(c, str(tmp_path))
    assert pre.step_compilations == 1 and sft.step_compilations == 1
    assert not sft.skipped, sft.skipped
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.trainer import model_for_stage

    cfg = model_for_stage(c, c.stages.pretrain)
    init = flatten(nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(c.seed))["params"]))
    after_pre = flatten(load_params(pre.final_dir))
    after_sft = flatten(load_params(sft.final_dir))
    for k in init:
        moved_pre = not np.array_equal(np.asarray(after_pre[k]), np.asarray(init[k]))
        assert moved_pre == (k.startswith("projector/") and k != "projector/pos_embed"), k
        moved_sft = not np.array_equal(np.asarray(after_sft[k]), np.asarray(after_pre[k]))
        assert moved_sft == (k.startswith(("projector/", "llm/")) and k != "projector/pos_embed"), k
    np.testing.assert_array_equal(after_sft["projector/pos_embed"], sincos_2d(12, after_sft["projector/pos_embed"]
                                                                                .shape[1]))


def test_resampler_checkpoint_round_trip(tmp_path):
    """mm_projector.bin with the original `model.mm_projector.*` names (§7), and a full original checkpoint,
    export and re-import bit-exact."""
    from uhd_jax.convert.cli import main as convert_cli
    from uhd_jax.config_loading import load_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import model_for_stage

    c = load_config("configs/uhd_v1.py:tiny")
    params = nn.meta.unbox(jax.jit(init_fn(model_for_stage(c, c.stages.sft)))(jax.random.PRNGKey(5))["params"])
    src = str(tmp_path / "ours")
    save_params(src, params, {"model": c.model.to_dict(), "family": "uhd_v1"})
    want = flatten(params)
    for fmt in ("mm_projector", "llava_original"):
        out = tmp_path / fmt
        assert convert_cli(["export", "--checkpoint", src, "--format", fmt, "--out", str(out)]) == 0
        if fmt == "mm_projector":
            state = torch.load(out / "mm_projector.bin", weights_only=True)
            d = c.model.llm.hidden_size
            assert state["model.mm_projector.attn.in_proj_weight"].shape == (3 * d, d)
            assert state["model.mm_projector.kv_proj.weight"].shape == (d, c.model.vision.hidden_size)
            assert "model.mm_projector.kv_proj.bias" not in state
            assert state["model.mm_projector.proj"].shape == (d, d)
            assert {k.rsplit(".", 1)[0] for k in state if "ln_" in k} == {
                f"model.mm_projector.ln_{n}" for n in ("q", "kv", "post")}
        again_dir = str(tmp_path / (fmt + "_again"))
        assert convert_cli(["import", "--src", str(out), "--out", again_dir, "--config",
                            "configs/uhd_v1.py:tiny"]) == 0, fmt
        again = flatten(load_params(again_dir))
        assert set(again) == ({k for k in want if k.startswith("projector/")} if fmt == "mm_projector" else set(want))
        for k, v in again.items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(want[k]), err_msg=k)


@pytest.mark.parametrize("variant, projector_params", [("7b", 89.3e6), ("13b", None), ("arxiv64", None),
                                                       ("qwen2_7b", None), ("tiny", None), ("demo", None)])
def test_configs_build_abstractly(variant, projector_params):
    """Every variant builds without materialising weights; the 7B resampler has the spec's 89.3M parameters."""
    from uhd_jax.config_loading import load_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.trainer import model_for_stage

    c = load_config(f"configs/uhd_v1.py:{variant}")
    cfg = model_for_stage(c, c.stages.sft)
    shapes = flatten(nn.meta.unbox(jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))["params"]))
    n = sum(math.prod(v.shape) for k, v in shapes.items() if k.startswith("projector/"))
    if projector_params:
        assert abs(n - projector_params) < 0.05e6, n
    if variant == "arxiv64":
        assert shapes["projector/query"].shape == (64, 5120) and shapes["projector/in_proj/kernel"].shape[2] == 8
    if variant == "qwen2_7b":   # spec §2.2, §7: D 3584, 28 heads of 128; Qwen2-7B: 28 layers, GQA 28/4, q/k/v biases
        assert shapes["projector/query"].shape == (144, 3584)
        assert shapes["projector/in_proj/kernel"].shape == (3584, 3, 28, 128)
        assert shapes["llm/embed_tokens/embedding"].shape == (152064, 3584)
        assert shapes["llm/layers/attn/q/bias"].shape == (28, 28, 128)     # scanned: (layers, heads, head_dim)
        assert shapes["llm/layers/attn/k/bias"].shape == (28, 4, 128)
        assert c.stages.sft.template == "qwen_1_5" and c.stages.pretrain.template == "plain"
        assert c.tokenizer.endswith("Qwen2-7B-Instruct") and c.stages.pretrain.init_checkpoints == [
            "checkpoints/uhd_v1-qwen2_7b-init"]
    from uhd_jax.train.trainer import packed_layout

    layout = packed_layout(c, cfg)
    assert layout.box_dtype == (None if variant in ("tiny", "demo") else "bfloat16")  # bf16 training rounds boxes
    if variant in ("7b", "13b"):
        assert layout.patch_budget == 8 * 577 and layout.max_images == 8


def test_window_boxes_round_to_the_compute_dtype():
    from uhd_jax.models.projectors.windows import window_edges

    start, end = window_edges(7, 80, 12)[2:]
    assert np.isclose(end[0], 80 / 12)
    s16, e16 = window_edges(7, 80, 12, "bfloat16")[2:]
    assert e16[0] == 6.65625 and s16[5] == np.float32(33.25)  # 6.6667 and 33.333 rounded to 8-bit mantissas
    assert not np.array_equal(roi_taps(7, 80, 12, 16, None)[1], roi_taps(7, 80, 12, 16, "bfloat16")[1])


def test_uhd_generation_is_batch_invariant(synthetic_data):
    """Greedy answers of a UHD model do not depend on what else is in the batch (left padding, packed slices)."""
    from uhd_jax.data.dataset import SamplePreparer, read_samples
    from uhd_jax.eval.decoding import GenerationConfig
    from uhd_jax.eval.generate import Generator
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.trainer import model_for_stage, packed_layout, preparer_factory, stage_sources
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    c = tiny_uhd(synthetic_data)
    cfg = model_for_stage(c, c.stages.sft)
    params = nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(1))["params"])
    prep = preparer_factory(c, c.stages.sft, cfg)(stage_sources(c, c.stages.sft)[0])
    assert isinstance(prep, SamplePreparer) and prep.image_mode == "uhd"
    samples = read_samples(os.path.join(synthetic_data["root"], "eval_sft.json"))[:3]
    prompts = [prep.prompt(s) for s in samples]
    assert len({len(p["pixels"]) for p in prompts}) > 1 or len(prompts[0]["pixels"]) > 1
    tok = AutoTokenizer.from_pretrained(synthetic_data["tokenizer"])
    layout = packed_layout(c, cfg)
    gen = GenerationConfig(max_new_tokens=4)
    # one bucket for all three prompts, so they really share a batch
    length = max(len(p["ids"]) for p in prompts)
    # together at the full patch budget, alone each in its patch-budget bucket: the buckets change no answer
    batched = Generator(cfg, params, tok, gen, batch_size=3, packed_layout=layout, smallest_bucket=length,
                        patch_buckets=1)
    together = batched.token_ids(prompts)
    assert batched.compilations == 1
    singles = [Generator(cfg, params, tok, gen, batch_size=1, packed_layout=layout, smallest_bucket=length)
               for _ in prompts]
    alone = [g.token_ids([p])[0] for g, p in zip(singles, prompts)]
    assert min(b for g in singles for _, _, b in g.programs) < layout.patch_budget
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a, b)
    assert any(len(t) for t in together)
