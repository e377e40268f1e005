"""LLaVA-UHD v2's JBU (VDIM) pretraining stage (spec uhd.md §4.4): FeatUp's jitter, attention downsampler, scale net,
CRF term and the whole multi-view objective against torch references written here from FeatUp's semantics; the
torch NAdam; the image transform; the stage itself (objective decreases, trains exactly the JBU, exact resume, its
checkpoint feeds the LLaVA stages)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.test_uhd_v2 import TorchJBU4x, randomized
from tests.torch_helpers import rel_err
from tests.uhd_helpers import convert_state, tiny_uhd
from uhd_jax.convert import tables
from uhd_jax.models.projectors import vdim
from uhd_jax.train.param_tree import flatten


def nhwc(x):
    return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))


def to_nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


# ------------------------------------------------------------------ torch references (FeatUp semantics)

def torch_jitter(img, max_pad, zoom, row, col, flip):
    """FeatUp `apply_jitter` for one image (1, C, H, W)."""
    h, w = img.shape[2:]
    padded = F.pad(img, [max_pad] * 4, mode="reflect")
    zoomed = F.interpolate(padded, scale_factor=zoom, mode="bilinear") if zoom > 1.0 else padded
    cropped = zoomed[:, :, row:h + row, col:w + col]
    return torch.flip(cropped, [3]) if flip else cropped


def torch_blur(x, k=5, sigma=1.0):
    t = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, k, k)
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect"), kernel, groups=x.shape[1])


class TorchDownsampler(torch.nn.Module):
    """FeatUp's AttentionDownsampler (blur on), with the logit keep-mask as an argument (ones = eval)."""

    def __init__(self, dim, kernel_size, final_size):
        super().__init__()
        self.k, self.f = kernel_size, final_size
        self.attention_net = torch.nn.Sequential(torch.nn.Dropout(.2), torch.nn.Linear(dim, 1))
        self.w = torch.nn.Parameter(torch.ones(kernel_size, kernel_size) + .3 * torch.randn(kernel_size, kernel_size))
        self.b = torch.nn.Parameter(.3 * torch.randn(kernel_size, kernel_size))

    def forward(self, hr):
        b, c, h, w = hr.shape
        stride = (h - self.k) // (self.f - 1)
        patches = torch.nn.Unfold(self.k, stride=stride)(torch_blur(hr)).reshape(
            b, c, self.k * self.k, self.f, self.f).permute(0, 3, 4, 2, 1)
        logits = self.attention_net(patches).squeeze(-1)
        attn = F.softmax(logits * self.w.flatten() + self.b.flatten(), dim=-1)
        return torch.einsum("bhwpc,bhwp->bchw", patches, attn)


class TorchScaleNet(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = torch.nn.Conv2d(dim, 1, 1)

    def forward(self, x):
        return torch.exp(self.net(x) + .1).clamp_min(.0001)


def torch_crf(guidance, features, coords, s=vdim.CRFSpec()):
    h, w = guidance.shape[2:]
    norm = coords.T.float() / torch.tensor([h, w]).unsqueeze(-1)
    coord_diff = (norm.unsqueeze(-1) - norm.unsqueeze(-2)).square().sum(0).unsqueeze(0)
    g = guidance[:, :, coords[:, 0], coords[:, 1]]
    guidance_diff = (g.unsqueeze(-1) - g.unsqueeze(-2)).square().sum(1)
    kernel = (s.w1 * torch.exp(-coord_diff / (2 * s.alpha) - guidance_diff / (2 * s.beta))
              + s.w2 * torch.exp(-coord_diff / (2 * s.gamma)) - s.shift)
    f = features[:, :, coords[:, 0], coords[:, 1]]
    return ((f.unsqueeze(-1) - f.unsqueeze(-2)).square().sum(1) * kernel).mean()


class TorchVDIM(torch.nn.Module):
    """LLaVA-UHD v2's `forward_stageloss` objective, eval mode: per jitter, s2 = up1(lr), s4 = fixup(up2(s2 detached)),
    each resized to the image, jittered, downsampled, projected, uncertainty-weighted MSE (+ CRF on jitter 0)."""

    def __init__(self, dim, patch, grid):
        super().__init__()
        self.upsampler = TorchJBU4x(dim)
        self.downsampler_2x, self.downsampler_4x = TorchDownsampler(dim, patch, grid), TorchDownsampler(dim, patch,
                                                                                                          grid)
        self.scale_net_2x, self.scale_net_4x = TorchScaleNet(dim), TorchScaleNet(dim)

    def forward(self, img, lr, views, max_pad, crf_weight):
        size = img.shape[-1]
        total, parts = 0.0, {}
        for i, v in enumerate(views):
            _, _, h, w = lr.shape
            up = self.upsampler
            s2 = up.up1(lr, F.adaptive_avg_pool2d(img, (2 * h, 2 * w)))
            s4 = up.up2(s2.detach(), F.adaptive_avg_pool2d(img, (4 * h, 4 * w)))
            s4 = s4 + 0.1 * up.fixup_proj(s4)
            proj = v["proj"]
            target = torch.einsum("bchw,bcd->bdhw", v["lr_feats"], proj)
            for lv, hr in ((2, s2), (4, s4)):
                hr = F.interpolate(hr, (size, size), mode="bilinear", align_corners=False)
                hr_jit = torch.cat([torch_jitter(hr[j:j + 1], max_pad, *p) for j, p in enumerate(v["params"])])
                down = torch.einsum("bchw,bcd->bdhw", getattr(self, f"downsampler_{lv}x")(hr_jit), proj)
                scales = getattr(self, f"scale_net_{lv}x")(v["lr_feats"])
                rec = ((down - target).square() / (2 * scales ** 2) + scales.log()).mean() / len(views)
                parts[f"rec_{lv}x"] = parts.get(f"rec_{lv}x", 0.0) + rec
                total = total + rec
                if i == 0:
                    crf = torch_crf(img, torch.einsum("bchw,bcd->bdhw", hr_jit, proj), v["coords"])
                    parts[f"crf_{lv}x"] = crf
                    total = total + crf_weight * crf
        return total, parts


# ------------------------------------------------------------------ pieces

@pytest.mark.parametrize("zoom, row, col, flip", [(1.0, 0, 0, False), (1.0, 30, 17, True), (1.5, 41, 3, False),
                                                  (1.37, 12, 60, True), (1.999, 90, 95, True)])
def test_jitter_matches_featup(zoom, row, col, flip):
    torch.manual_seed(0)
    img = torch.randn(1, 5, 56, 56)
    want = torch_jitter(img, 20, zoom, row, col, flip)
    params = {"zoom": jnp.asarray([zoom], jnp.float32), "row": jnp.asarray([row]), "col": jnp.asarray([col]),
              "flip": jnp.asarray([flip])}
    got = vdim.apply_jitter(nhwc(img), params, vdim.JitterSpec(max_pad=20))
    # A zoom's float32 source coordinates (~100 px, ulp 7.6e-6) round differently in torch's CPU kernel (which forms
    # scale * (i + .5) first) and ours (CUDA's order); both are ~3e-5 from the exact map at zoom 1.999.
    assert rel_err(to_nchw(got), want.numpy()) <= (1e-4 if zoom > 1 else 1e-6)


def test_sampled_jitters_stay_inside_the_zoomed_image():
    spec = vdim.JitterSpec(max_pad=30, max_zoom=2.0)
    p = jax.device_get(vdim.sample_jitter(jax.random.PRNGKey(3), 4000, 336, spec))
    zoomed = np.floor((336 + 60) * p["zoom"]).astype(int)
    assert (p["row"] >= 0).all() and (p["row"] + 336 <= zoomed).all() and (p["col"] + 336 <= zoomed).all()
    assert 0.45 < (p["zoom"] == 1.0).mean() < 0.55 and 0.45 < p["flip"].mean() < 0.55
    assert p["zoom"].max() < 2.0 and p["zoom"].min() >= 1.0


def test_attention_downsampler_and_crf_match_featup():
    torch.manual_seed(1)
    c, k, f = 6, 14, 4
    ref = TorchDownsampler(c, k, f).eval()
    hr = torch.randn(2, c, k * f, k * f)
    model = vdim.AttentionDownsampler(k, f)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), nhwc(hr))["params"]
    state = {f"downsampler_2x.{n}": v for n, v in ref.state_dict().items()}
    params, _ = convert_state(state, {"downsampler_2x": shapes}, tables.VDIM_OBJECTIVE)
    got = model.apply({"params": params["downsampler_2x"]}, nhwc(hr))
    assert rel_err(to_nchw(got), ref(hr).detach().numpy()) <= 1e-5

    img, feats = torch.randn(2, 3, 40, 40), torch.randn(2, 7, 40, 40)
    coords = torch.stack([torch.randint(0, 40, (300,)), torch.randint(0, 40, (300,))], -1)
    want = torch_crf(img, feats, coords).item()
    at = nhwc(feats)[:, coords[:, 0].numpy(), coords[:, 1].numpy()]
    got = float(vdim.crf_loss(nhwc(img), at, jnp.asarray(coords.numpy()), vdim.CRFSpec()))
    assert abs(got - want) <= 1e-5 * abs(want)


def test_vdim_objective_and_its_gradients_match_torch():
    """The whole objective (2 jitters, both levels, CRF, stop-gradient between the JBU stages): loss, its parts and
    the gradients of both JBU stages, a downsampler and a scale net."""
    torch.manual_seed(2)
    c, g, patch, pad = 8, 3, 14, 6
    size = g * patch
    ref = TorchVDIM(c, patch, g)
    randomized(ref.upsampler, 5)
    with torch.no_grad():
        for m in (ref.scale_net_2x, ref.scale_net_4x):
            m.net.weight.normal_(0, 0.2)
    ref.eval()
    img, lr = torch.randn(2, 3, size, size), torch.randn(2, c, g, g)
    jitters = [[(1.0, 3, 9, True), (1.6, 20, 1, False)], [(1.25, 7, 7, False), (1.0, 0, 12, True)]]
    views = []
    for i, params in enumerate(jitters):
        proj = torch.randn(2, c, 5)
        views.append({"params": params, "lr_feats": torch.randn(2, c, g, g), "proj": proj / proj.norm(dim=1, keepdim=True),
                      "coords": torch.stack([torch.randint(0, size, (200,)), torch.randint(0, size, (200,))], -1)})
    total, parts = ref(img, lr, views, pad, 0.001)
    total.backward()

    spec = vdim.VDIMSpec(n_jitters=2, jitter=vdim.JitterSpec(max_pad=pad), proj_dim=5)
    model = vdim.VDIMObjective(patch, g, spec)
    ours_views = [{"params": {"zoom": jnp.asarray([p[0] for p in v["params"]], jnp.float32),
                              "row": jnp.asarray([p[1] for p in v["params"]]),
                              "col": jnp.asarray([p[2] for p in v["params"]]),
                              "flip": jnp.asarray([p[3] for p in v["params"]])},
                   "lr_feats": nhwc(v["lr_feats"]), "proj": jnp.asarray(v["proj"].numpy()),
                   "crf_coords": jnp.asarray(v["coords"].numpy())} for v in views]
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), nhwc(img), nhwc(lr), ours_views)["params"]
    state = ref.state_dict()
    up_shapes = shapes["upsampler"]
    up, _ = convert_state({k[len("upsampler."):]: v for k, v in state.items() if k.startswith("upsampler.")},
                          up_shapes, tables.JBU_STACK)
    rest, _ = convert_state({k: v for k, v in state.items() if not k.startswith("upsampler.")},
                            {k: v for k, v in shapes.items() if k != "upsampler"}, tables.VDIM_OBJECTIVE)
    params = {"upsampler": up, **rest}
    (loss, got_parts), grads = jax.jit(jax.value_and_grad(
        lambda p: model.apply({"params": p}, nhwc(img), nhwc(lr), ours_views), has_aux=True))(params)
    assert abs(float(loss) - total.item()) <= 1e-5 * abs(total.item())
    for k, v in parts.items():
        assert abs(float(got_parts[k]) - v.item()) <= 1e-5 * abs(v.item()), k
    pairs = [(grads["upsampler"]["up1"]["range_proj_0"]["kernel"], ref.upsampler.up1.range_proj[0].weight.grad),
             (grads["upsampler"]["up2"]["fixup_proj_3"]["bias"], ref.upsampler.up2.fixup_proj[3].bias.grad),
             (grads["upsampler"]["up1"]["range_temp"], ref.upsampler.up1.range_temp.grad),
             (grads["downsampler_4x"]["w"], ref.downsampler_4x.w.grad),
             (grads["scale_net_2x"]["kernel"], ref.scale_net_2x.net.weight.grad)]
    for ours, theirs in pairs:
        theirs = theirs.numpy()
        theirs = theirs[:, :, 0, 0].T if theirs.ndim == 4 else theirs
        assert rel_err(np.asarray(ours), theirs) <= 1e-4


def test_torch_nadam_and_the_warm_clip_match_torch():
    from uhd_jax.train.optimizer import clip_first_steps, torch_nadam

    torch.manual_seed(0)
    target = torch.randn(7, 3)
    w = torch.nn.Parameter(torch.randn(7, 3))
    opt = torch.optim.NAdam([w], lr=1e-2)
    params = jnp.asarray(w.detach().numpy())
    tx = optax.chain(clip_first_steps(0.05, 3), torch_nadam(1e-2))
    state = tx.init(params)
    for step in range(8):
        opt.zero_grad()
        ((w - target) ** 3).sum().backward()
        if step < 3:
            torch.nn.utils.clip_grad_norm_([w], 0.05)
        opt.step()
        grads = 3 * (params - jnp.asarray(target.numpy())) ** 2
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert rel_err(params, w.detach().numpy()) <= 1e-5


def test_vdim_image_is_featups_resize_nearest_and_center_crop(tmp_path):
    from uhd_jax.data.jbu_images import JBUImagePreparer, center_crop_box, resize_short_side, vdim_image

    assert resize_short_side((400, 300), 336) == (448, 336)
    assert resize_short_side((333, 500), 336) == (336, 504)   # int(336 * 500 / 333) = 504
    assert center_crop_box((448, 336), 336) == (56, 0, 392, 336)
    assert center_crop_box((336, 505), 336) == (0, 84, 336, 420)   # round(84.5) = 84 (banker's, as torchvision)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = vdim_image(Image.fromarray(arr), 15)   # 40x30 -> 20x15: PIL nearest samples pixel centres (odd pixels)
    want = (arr[1::2, 1::2][:, 2:17] / 255.0 - np.asarray(vdim.IMAGENET_MEAN)) / np.asarray(vdim.IMAGENET_STD)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    res = JBUImagePreparer(56)((0, str(bad)))
    assert res["id"] == str(bad) and "cannot decode" in res["skip"]


# ------------------------------------------------------------------ the stage

def test_jbu_stage_learns_trains_only_the_jbu_resumes_exactly_and_feeds_pretraining(synthetic_data, tmp_path):
    from uhd_jax.train.checkpoints import load_meta, load_params
    from uhd_jax.train.jbu_stage import JBUTraining, vdim_spec
    from uhd_jax.train.trainer import model_for_stage, run_stage

    c = tiny_uhd(synthetic_data, "configs/uhd_v2.py:tiny", steps=6)
    training = JBUTraining(model_for_stage(c, c.stages.jbu).vision, vdim_spec(c.stages.jbu), c.stages.jbu.image_size)
    init = flatten(nn.meta.unbox(jax.jit(training.init)(jax.random.PRNGKey(c.seed))))  # the jbu stage's seed
    straight = run_stage(c, "jbu", str(tmp_path / "a"))
    assert straight.step_compilations == 1 and len(straight.history) == 6
    meta = load_meta(straight.final_dir)
    before, after = meta["probe_objective"]
    assert after < 0.8 * before, (before, after)   # the multi-view objective on a fixed batch goes down
    final = flatten(load_params(straight.final_dir))
    assert {k.split("/")[0] for k in final} == {"projector", "vdim_objective", "vision"}
    assert set(final) == set(init)
    for k, v in init.items():   # every JBU / objective tensor learns, the ViT stays as it was
        assert (not np.array_equal(np.asarray(final[k]), np.asarray(v))) == (not k.startswith("vision/")), k

    # interrupted after 3 steps and resumed: the same parameters as the uninterrupted run
    assert run_stage(c, "jbu", str(tmp_path / "b"), stop_after=3).final_dir == ""
    resumed = flatten(load_params(run_stage(c, "jbu", str(tmp_path / "b")).final_dir))
    for k, v in final.items():
        np.testing.assert_array_equal(np.asarray(resumed[k]), np.asarray(v), err_msg=k)

    # the random ViT it trained against is frozen; the pretraining stage starts from the JBU and that ViT and
    # leaves the JBU as it found it, while the downsamplers and scale nets are dropped on load
    c.stages.pretrain.num_steps = 4   # as test_uhd_v2's run of the same stage: one compiled program for both
    pre = run_stage(c, "pretrain", str(tmp_path / "a"))
    got = flatten(load_params(pre.final_dir))
    for k, v in final.items():
        if k.startswith(("projector/upsampler/", "vision/")):
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
    assert not any(k.startswith("vdim_objective/") for k in got)
