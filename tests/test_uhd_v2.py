"""LLaVA-UHD v2: the JBU inverse feature pyramid (§4.2) and the HiWin projector (§4.3) against torch references
written from the spec; Qwen2 parity lives in test_llama.py."""
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.torch_helpers import rel_err
from tests.uhd_helpers import convert_state, tiny_uhd
from uhd_jax.convert import tables
from uhd_jax.models.projectors.jbu import MAP_NEIGHBOURHOOD, JBU4xStack, JBUStage, adaptive_avg_pool
from uhd_jax.train.param_tree import flatten


class TorchJBU(torch.nn.Module):
    """FeatUp's JBULearnedRange as the spec states it (7x7, key_dim 32), channels-first."""

    def __init__(self, feat_dim, key_dim=32, radius=3):
        super().__init__()
        self.radius, self.diameter = radius, 2 * radius + 1
        self.range_temp = torch.nn.Parameter(torch.tensor(0.3))
        self.sigma_spatial = torch.nn.Parameter(torch.tensor(0.8))
        self.range_proj = torch.nn.Sequential(torch.nn.Conv2d(3, key_dim, 1), torch.nn.GELU(), torch.nn.Dropout2d(.1),
                                              torch.nn.Conv2d(key_dim, key_dim, 1))
        d2 = self.diameter ** 2
        self.fixup_proj = torch.nn.Sequential(torch.nn.Conv2d(d2 + 3, d2, 1), torch.nn.GELU(), torch.nn.Dropout2d(.1),
                                              torch.nn.Conv2d(d2, d2, 1))

    def forward(self, source, guidance):
        b, _, gh, gw = guidance.shape
        d, r = self.diameter, self.radius
        dist = torch.linspace(-1, 1, d)
        x, y = torch.meshgrid(dist, dist, indexing="ij")
        spatial = torch.exp(-(x ** 2 + y ** 2) / (2 * self.sigma_spatial ** 2)).reshape(1, d * d, 1, 1)
        proj = self.range_proj(guidance)
        padded = F.pad(proj, [r] * 4, mode="reflect")
        queries = torch.nn.Unfold(d)(padded).reshape(b, proj.shape[1], d * d, gh, gw).permute(0, 1, 3, 4, 2)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        rng = F.softmax(temp * torch.einsum("bchwp,bchw->bphw", queries, proj), dim=1)
        kernel = rng * spatial
        kernel = kernel / kernel.sum(1, keepdim=True).clamp(1e-7)
        kernel = kernel + .1 * self.fixup_proj(torch.cat([kernel, guidance], dim=1))
        up = F.interpolate(source, (gh, gw), mode="bicubic", align_corners=False)
        up = F.pad(up, [r] * 4, mode="reflect")
        patches = torch.nn.Unfold(d)(up).reshape(b, source.shape[1], d * d, gh, gw)
        return torch.einsum("bcphw,bphw->bchw", patches, kernel)


class TorchJBU4x(torch.nn.Module):
    def __init__(self, feat_dim):
        super().__init__()
        self.up1, self.up2 = TorchJBU(feat_dim), TorchJBU(feat_dim)
        self.fixup_proj = torch.nn.Sequential(torch.nn.Dropout2d(0.2), torch.nn.Conv2d(feat_dim, feat_dim, 1))

    def forward(self, source, image):
        _, _, h, w = source.shape
        s2 = self.up1(source, F.adaptive_avg_pool2d(image, (2 * h, 2 * w)))
        s4 = self.up2(s2, F.adaptive_avg_pool2d(image, (4 * h, 4 * w)))
        return s2, s4 + 0.1 * self.fixup_proj(s4)


def randomized(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim:
                p.normal_(0, 0.3)
    return module.eval()


def nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("h, w", [(1, 1), (3, 3), (2, 5), (6, 4)])
def test_adaptive_pool_matches_torch(h, w):
    img = torch.randn(2, 3, 14 * h, 14 * w)
    for scale in (2, 4):
        want = F.adaptive_avg_pool2d(img, (scale * h, scale * w)).numpy().transpose(0, 2, 3, 1)
        got = np.asarray(adaptive_avg_pool(nhwc(img), (scale * h, scale * w)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h, w", [(1, 1), (3, 3), (2, 5), (8, 32)])
def test_host_guidance_pooling_is_torchs_adaptive_pool_in_float64(h, w):
    """The data path pools each level's guidance image on the host (tiled windows at 2x, overlapping ones at 4x:
    14 / 4 pixels per cell), summing in float64 as torch does for a float64 input."""
    from uhd_jax.data.uhd_images import area_pool

    img = np.random.default_rng(h * w).normal(size=(14 * h, 14 * w, 3)).astype(np.float32)
    for out in ((2 * h, 2 * w), (4 * h, 4 * w), (5 * h, 3 * w), (14 * h, 14 * w)):
        want = F.adaptive_avg_pool2d(torch.from_numpy(img).double().permute(2, 0, 1)[None], out)[0].permute(1, 2, 0)
        got = area_pool(area_pool(img, out[0], axis=0), out[1], axis=1)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("h, w", [(4, 4), (3, 6), (5, 2)])
def test_jbu_4x_stack_matches_torch(h, w):
    c = 16
    ref = TorchJBU4x(c)
    randomized(ref, h * 10 + w)
    torch.manual_seed(1)
    source = torch.randn(2, c, h, w)
    image = torch.randn(2, 3, 14 * h, 14 * w)
    with torch.no_grad():
        want2, want4 = ref(source, image)
    model = JBU4xStack()
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), nhwc(source), nhwc(image))["params"]
    params, _ = convert_state(ref.state_dict(), shapes, tables.JBU_STACK)
    got2, got4 = model.apply({"params": params}, nhwc(source), nhwc(image))
    assert rel_err(np.asarray(got2), want2.numpy().transpose(0, 2, 3, 1)) <= 1e-5
    assert rel_err(np.asarray(got4), want4.numpy().transpose(0, 2, 3, 1)) <= 1e-5


def test_jbu_dropout_only_in_training():
    c, h, w = 8, 6, 6
    rng = np.random.default_rng(0)
    x, guide = jnp.asarray(rng.normal(size=(1, h, w, c))), jnp.asarray(rng.normal(size=(1, h, w, 3)))
    stage = JBUStage()
    params = stage.init(jax.random.PRNGKey(0), x, guide, MAP_NEIGHBOURHOOD)
    a = stage.apply(params, x, guide, MAP_NEIGHBOURHOOD)
    np.testing.assert_array_equal(a, stage.apply(params, x, guide, MAP_NEIGHBOURHOOD))
    b = stage.apply(params, x, guide, MAP_NEIGHBOURHOOD, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(b, a)


# ------------------------------------------------------------------------------------------------ HiWin


class TorchHiWin(torch.nn.Module):
    """The spec's v2 projector forward (§4.3) for one image, with the original's state-dict names (including the
    parts LLaVA never uses: `query`, `kv_proj`, the 8x level and the upsampler's ChannelNorm)."""

    def __init__(self, d, heads, c, mask, grid=12):
        super().__init__()
        from uhd_jax.models.projectors.resampler import sincos_2d

        self.grid, self.levels = grid, [lv for lv in (1, 2, 4) if mask & lv]
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(grid, d)))
        self.query = torch.nn.Parameter(torch.randn(grid * grid, d))
        self.kv_proj = torch.nn.Linear(c, d, bias=False)
        for n in range(1, 5):
            setattr(self, f"query_{n}", torch.nn.Parameter(torch.randn(grid * grid, d) * 0.5))
        for lv in ("1x", "2x", "4x", "8x"):
            setattr(self, f"features_{lv}_projector", torch.nn.Linear(c, d))
            setattr(self, f"feature_{lv}_embedding", torch.nn.Parameter(torch.randn(1, 1, d) * 0.3))
        self.attn = torch.nn.MultiheadAttention(d, heads)
        self.ln_q, self.ln_kv, self.ln_proj, self.ln_post = (torch.nn.LayerNorm(d, eps=1e-6) for _ in range(4))
        self.cat_proj = torch.nn.Linear(4 * d, d)
        self.proj = torch.nn.Parameter(torch.randn(d, d) * d ** -0.5)
        self.upsampler = torch.nn.Module()
        self.upsampler.upsampler = TorchJBU4x(c)
        self.upsampler.model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Module())
        self.upsampler.model[1].norm = torch.nn.LayerNorm(c)   # the unused ChannelNorm

    def forward(self, feats, image):
        """feats (C, h, w), image (3, 14h, 14w) -> (144, D)."""
        from tests.uhd_helpers import windows_reference

        d = self.pos_embed.shape[1]
        s2, f4 = self.upsampler.upsampler(feats[None], image[None])
        maps = {1: feats, 2: s2[0], 4: f4[0]}
        keys, vals = [], []
        for lv in self.levels:
            m = maps[lv]
            hh, ww = m.shape[1:]
            x = self.ln_kv(getattr(self, f"features_{lv}x_projector")(m.permute(1, 2, 0)))          # (H, W, D)
            table = self.pos_embed.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
            pos = F.interpolate(table, (hh, ww), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
            k = x + pos + getattr(self, f"feature_{lv}x_embedding")[0]
            keys.append(torch.from_numpy(windows_reference(k.permute(2, 0, 1).detach().numpy(), self.grid)))
            vals.append(torch.from_numpy(windows_reference(x.permute(2, 0, 1).detach().numpy(), self.grid)))
        k = torch.cat(keys, 1).float().transpose(0, 1)                                             # (P, 144, D)
        v = torch.cat(vals, 1).float().transpose(0, 1)
        outs = []
        for n in range(1, 5):
            q = self.ln_q(getattr(self, f"query_{n}")) + self.pos_embed
            outs.append(self.ln_proj(self.attn(q[None], k, v, need_weights=False)[0][0]))
        return self.ln_post(self.cat_proj(torch.cat(outs, -1))) @ self.proj


def hiwin_rows(samples, c, seed=0, jbu_top=4):
    """Packed rows (one per sample) of random 1x feature maps and random guidance images; levels up to `jbu_top`."""
    from uhd_jax.data.uhd_images import PackedLayout, fill_row

    rng = np.random.default_rng(seed)
    n_img = max(len(s) for s in samples)
    budget = max(sum(1 + h * w for h, w in s) for s in samples) + 3
    layout = PackedLayout(patch_budget=budget, max_images=n_img, jbu=True, jbu_top=jbu_top)
    arrays = layout.zeros(len(samples))
    feats = np.zeros((len(samples), budget, c), np.float32)
    per_image = []
    for row, sizes in enumerate(samples):
        images = [rng.normal(size=(14 * h, 14 * w, 3)).astype(np.float32) for h, w in sizes]
        fill_row(arrays, row, images, layout)
        offset, mine = 0, []
        for (h, w), img in zip(sizes, images):
            m = rng.normal(size=(h * w, c)).astype(np.float32)
            feats[row, offset + 1:offset + 1 + h * w] = m
            mine.append((torch.from_numpy(m.T.reshape(c, h, w).copy()),
                         torch.from_numpy(img.transpose(2, 0, 1).copy())))
            offset += 1 + h * w
        per_image.append(mine)
    return {k: jnp.asarray(v) for k, v in arrays.items()}, jnp.asarray(feats), per_image


@pytest.mark.parametrize("mask", [3, 5, 7])
def test_hiwin_matches_torch_reference(mask):
    """A 2-slice sample (two slices + overview of different sizes) and a global-only sample in one batch. Mask 3
    (the demo's 1x and 2x levels) reads data that holds no 4x rows."""
    from uhd_jax.models.projectors.hiwin import HiWinResampler, top_jbu_level

    d, heads, c = 64, 4, 16
    torch.manual_seed(mask)
    ref = TorchHiWin(d, heads, c, mask)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.normal_(0.2, 0.3)
        for name, p in ref.upsampler.upsampler.named_parameters():
            p.normal_(0.0, 0.3) if p.ndim else p.fill_(0.5 if "temp" in name else 1.2)
    ref.eval()
    images, feats, per_image = hiwin_rows([[(4, 4), (3, 5), (2, 6)], [(5, 3)]], c, jbu_top=top_jbu_level(mask))
    assert any(k.startswith("l4_") for k in images) == (mask & 4 > 0)
    model = HiWinResampler(embed_dim=d, num_heads=heads, feature_scale_mask=mask)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), feats, images)["params"]
    params, skipped = convert_state(ref.state_dict(), shapes, tables.HIWIN_ORIGINAL, tables.HIWIN_SKIPPED,
                                    prefix="mm_projector.")
    assert "query" in skipped and "upsampler.model.1.norm.weight" in skipped and "features_8x_projector.weight" in skipped
    out = np.asarray(model.apply({"params": params}, feats, images))
    train_mode = model.apply({"params": params}, feats, images, False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert not np.allclose(np.asarray(train_mode), out)  # the JBU's dropouts are live in training only
    with torch.no_grad():
        for row, mine in enumerate(per_image):
            for k, (f, img) in enumerate(mine):
                assert rel_err(out[row, k], ref(f, img).numpy()) <= 1e-5, (row, k)


# ------------------------------------------------------------------------------------------------ configs, training


@pytest.mark.parametrize("variant", ["7b", "qwen2_7b", "13b", "tiny", "demo"])
def test_v2_configs_build_abstractly(variant):
    from uhd_jax.config_loading import load_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.trainer import model_for_stage

    c = load_config(f"configs/uhd_v2.py:{variant}")
    cfg = model_for_stage(c, c.stages.sft)
    shapes = flatten(nn.meta.unbox(jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))["params"]))
    # the 4x stage's parameters exist even where no 4x level is kept (the demo keeps 1x and 2x): the original's layout
    assert "projector/upsampler/up2/fixup_proj_3/kernel" in shapes and "projector/query_4" in shapes
    assert ("projector/features_2x_projector/kernel" in shapes) == (c.model.feature_scale_mask & 2 > 0)
    if variant == "qwen2_7b":
        assert shapes["llm/layers/attn/q/bias"].shape[-2:] == (28, 128) and c.stages.sft.template == "qwen_1_5"
    assert c.data.schema == ("grid" if variant == "7b" else "v1")


def test_v2_stages_train_exactly_the_recipes_parameters(synthetic_data, tmp_path):
    """jbu -> pretrain -> sft. pretrain starts from the jbu stage's upsampler (and, in the tiny config, the random ViT
    it was trained against) and trains the HiWin projector minus the JBU; sft: ViT + HiWin + the JBU's fixup + LLM
    (spec §6)."""
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import load_params
    from uhd_jax.train.trainer import model_for_stage, run

    c = tiny_uhd(synthetic_data, "configs/uhd_v2.py:tiny", steps=4)
    assert tuple(c.stage_order) == ("jbu", "pretrain", "sft") and c.stages.pretrain.init_from_stage == "jbu"
    jbu_run, pre, sft = run(c, str(tmp_path))
    assert jbu_run.step_compilations == pre.step_compilations == sft.step_compilations == 1
    start = flatten(nn.meta.unbox(jax.jit(init_fn(model_for_stage(c, c.stages.pretrain)))(
        jax.random.PRNGKey(c.seed + 1))["params"]))   # the pretrain stage's seed
    from_jbu = {k: v for k, v in flatten(load_params(jbu_run.final_dir)).items()
                if not k.startswith("vdim_objective/")}
    assert set(from_jbu) == {k for k in start if k.startswith(("vision/", "projector/upsampler/"))}
    start.update(from_jbu)
    after_pre, after_sft = flatten(load_params(pre.final_dir)), flatten(load_params(sft.final_dir))
    jbu = re.compile(r"projector/upsampler/up[12]/")
    used_layers = c.model.vision.num_layers + c.model.vision.select_layer + 1

    def unused_vision(k):  # the ViT computes up to select_layer: later layers and post_layernorm get no gradient
        m = re.match(r"vision/layers_(\d+)/", k)
        return k.startswith("vision/post_layernorm") or bool(m and int(m.group(1)) >= used_layers)
    for k in start:
        moved = not np.array_equal(np.asarray(after_pre[k]), np.asarray(start[k]))
        want = k.startswith("projector/") and not k.startswith("projector/upsampler/") and k != "projector/pos_embed"
        assert moved == want, ("pretrain", k)
        moved = not np.array_equal(np.asarray(after_sft[k]), np.asarray(after_pre[k]))
        want = not jbu.match(k) and not unused_vision(k) and k != "projector/pos_embed"
        assert moved == want, ("sft", k)


def test_v2_projector_round_trip_and_skips(tmp_path):
    """Our v2 projector exports to `model.mm_projector.*` and re-imports bit-exactly; an original projector's
    unused parts (CLIP copy, ChannelNorm, v1 query/kv_proj, unkept levels) are reported as skipped."""
    from safetensors.numpy import load_file, save_file

    from uhd_jax.convert.cli import main as convert_cli
    from uhd_jax.convert.importer import Source, import_checkpoint
    from uhd_jax.config_loading import load_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import model_for_stage

    c = load_config("configs/uhd_v2.py:tiny")
    params = nn.meta.unbox(jax.jit(init_fn(model_for_stage(c, c.stages.sft)))(jax.random.PRNGKey(2))["params"])
    src = str(tmp_path / "ours")
    save_params(src, params, {"model": c.model.to_dict(), "family": "uhd_v2"})
    out = tmp_path / "orig"
    assert convert_cli(["export", "--checkpoint", src, "--format", "llava_original", "--out", str(out)]) == 0
    state = load_file(out / "model.safetensors")
    assert "model.mm_projector.upsampler.upsampler.up1.range_proj.0.weight" in state
    assert state["model.mm_projector.cat_proj.weight"].shape == (c.model.llm.hidden_size,
                                                                4 * c.model.llm.hidden_size)
    d = c.model.llm.hidden_size
    extra = {"model.mm_projector.query": np.zeros((144, d), np.float32),
             "model.mm_projector.kv_proj.weight": np.zeros((d, 32), np.float32),
             "model.mm_projector.features_8x_projector.weight": np.zeros((d, 32), np.float32),
             "model.mm_projector.features_2x_projector.bias": np.zeros((d,), np.float32),
             "model.mm_projector.upsampler.model.1.norm.weight": np.zeros((32,), np.float32),
             "model.mm_projector.upsampler.model.0.vision_tower.vision_model.post_layernorm.bias": np.zeros(
                 (32,), np.float32)}
    save_file({**state, **extra}, str(out / "model.safetensors"))
    again, report = import_checkpoint([Source(str(out))], c.model.to_dict())
    assert set(report["skipped"]) == set(extra)
    flat, want = flatten(again), flatten(params)
    assert set(flat) == set(want)
    for k, v in flat.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(want[k]), err_msg=k)


def test_vdim_checkpoint_imports_into_the_v2_upsampler(tmp_path):
    """A FeatUp/VDIM Lightning .ckpt: the JBU stack lands in projector/upsampler, the downsamplers, scale nets and the
    featurizer are reported as skipped, and nothing else of the projector is expected from it."""
    from uhd_jax.convert.cli import main as convert_cli
    from uhd_jax.config_loading import load_config
    from uhd_jax.train.checkpoints import load_params

    c = load_config("configs/uhd_v2.py:tiny")
    ref = randomized(TorchJBU4x(c.model.vision.hidden_size), 9)
    state = {f"upsampler.{k}": v for k, v in ref.state_dict().items()}
    state.update({"downsampler.w": torch.ones(14, 14), "scale_net.0.weight": torch.ones(1, 4, 1, 1),
                  "model.0.patch.weight": torch.ones(3)})
    path = tmp_path / "clip-large-vdim.ckpt"
    torch.save({"state_dict": state, "epoch": 5, "global_step": 2000}, path)
    out = tmp_path / "vdim"
    assert convert_cli(["import", "--src", str(path), "--config", "configs/uhd_v2.py:tiny", "--out", str(out)]) == 0
    got = flatten(load_params(str(out)))
    assert set(got) == {f"projector/upsampler/{k}" for k in (
        *(f"up{n}/{m}_{i}/{p}" for n in (1, 2) for m in ("range_proj", "fixup_proj") for i in (0, 3)
          for p in ("kernel", "bias")),
        *(f"up{n}/{p}" for n in (1, 2) for p in ("range_temp", "sigma_spatial")),
        "fixup_proj_1/kernel", "fixup_proj_1/bias")}
    np.testing.assert_array_equal(got["projector/upsampler/up2/range_proj_3/kernel"],
                                  ref.up2.range_proj[3].weight.detach().numpy()[:, :, 0, 0].T)
    report = json.loads((out / "config.json").read_text())
    assert set(report["conversion"]["skipped"]) >= {"downsampler.w", "scale_net.0.weight", "model.0.patch.weight"}


def test_slices_too_small_for_the_jbu_are_counted_skips_not_crashes(synthetic_data, tmp_path):
    from PIL import Image

    from uhd_jax.data.pipeline import Source
    from uhd_jax.train.trainer import model_for_stage, preparer_factory

    c = tiny_uhd(synthetic_data, "configs/uhd_v2.py:tiny")
    c.data.patch_budget = 1000  # room enough: the JBU's own limit is what this sample hits
    Image.new("RGB", (2000, 14), (200, 30, 30)).save(tmp_path / "strip.png")   # slices and overview 1 patch high
    prep = preparer_factory(c, c.stages.sft, model_for_stage(c, c.stages.sft))(Source("x.json", str(tmp_path)))
    sample = {"id": "strip", "image": "strip.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "a strip"}]}
    out = prep((0, sample))
    assert "too small for the JBU" in out["skip"] and out["id"] == "strip"


def test_overview_only_stages_pack_one_image_per_sample():
    """UHD pretraining sees overviews only: its packed rows hold one image, not M + 1 (5x less ViT/JBU work)."""
    from uhd_jax.config_loading import load_config
    from uhd_jax.train.trainer import model_for_stage, packed_layout

    c = load_config("configs/uhd_v2.py:7b")
    cfg = model_for_stage(c, c.stages.pretrain)
    pre, sft = packed_layout(c, cfg, c.stages.pretrain), packed_layout(c, cfg, c.stages.sft)
    assert (pre.max_images, pre.patch_budget) == (1, 577)
    assert (sft.max_images, sft.patch_budget) == (8, 8 * 577)
