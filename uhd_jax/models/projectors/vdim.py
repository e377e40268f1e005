"""The JBU (VDIM) pretraining objective of LLaVA-UHD v2 (spec uhd.md §4.4): FeatUp's multi-view reconstruction.

The upsampler sees the frozen ViT's features of an image and the image itself and predicts 2x and 4x maps. Each map
is resized to the image's resolution, jittered exactly as the image was (reflect pad, optional zoom, crop, h-flip),
pooled back to the ViT grid by a learned attention downsampler, and compared with the ViT's features of the jittered
image in a random 30-dimensional projection, weighted by a predicted per-pixel uncertainty (`ScaleNet`). A sampled
CRF term keeps the high-resolution maps smooth where the image is. Total = loss(4x) + loss(2x); the 4x stage sees
the 2x map through a stop-gradient ("stage loss").

Everything here is channels-last and has static shapes: the jitter is a per-image pair of 2-tap interpolation
matrices built from the sampled parameters, so any zoom/offset/flip compiles once; composed with the resize to the
image and the downsampler's blur, each level costs two small matrix products instead of passes over full maps.
The downsampler pools the map's random projection (30 channels), not the map: pooling is linear, so the loss is the
same, and the image-sized map exists in all its channels only for the dropout's scores, one image at a time. (Kept
whole for the backward pass, the 1024-channel 336^2 map, its dropout mask and its dropped copy took ~1.9 GB per
image, jitter and level.)

Parameter names follow FeatUp (`downsampler.attention_net.1`, `.w`, `.b`, `scale_net.net`), one downsampler and one
scale net per level (`*_2x`, `*_4x`); none of them is used by LLaVA (the importer drops them).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.models.interpolate import reflect_index
from uhd_jax.models.projectors.jbu import JBU4xStack, conv1x1, resize_separable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LEVELS = (2, 4)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch `F.interpolate(mode='bilinear', align_corners=False)` along one axis, given size."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float64)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - w1)
    np.add.at(m, (np.arange(out_size), i1), w1)
    return m


def resize_bilinear(x, size: int):
    """(B, h, w, C) -> (B, size, size, C), torch bilinear (no antialias), float32."""
    if x.shape[1:3] == (size, size):
        return x.astype(jnp.float32)
    return resize_separable(x, bilinear_matrix(x.shape[1], size), bilinear_matrix(x.shape[2], size))


def blur_matrix(n: int, kernel_size: int = 5, sigma: float = 1.0) -> np.ndarray:
    """(n, n) matrix of kornia's `gaussian_blur2d(x, k, (s, s))` along one axis: normalised Gaussian taps at
    offsets -k//2 .. k//2, reflect border."""
    r = kernel_size // 2
    t = np.arange(kernel_size, dtype=np.float64) - r
    k = np.exp(-(t ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    m = np.zeros((n, n), np.float64)
    for i in range(n):
        np.add.at(m[i], reflect_index(i + np.arange(kernel_size) - r, n), k)
    return m


def pad_matrix(n: int, pad: int) -> np.ndarray:
    """(n + 2 pad, n) matrix of reflect padding along one axis."""
    m = np.zeros((n + 2 * pad, n), np.float64)
    m[np.arange(n + 2 * pad), reflect_index(np.arange(n + 2 * pad) - pad, n)] = 1.0
    return m


def patch_index(size: int, kernel: int, final: int) -> np.ndarray:
    """Rows (or columns) of the downsampler's `final` x `final` grid of kernel x kernel patches, patch-major."""
    stride = (size - kernel) // (final - 1) if final > 1 else size
    return (np.arange(final)[:, None] * stride + np.arange(kernel)[None, :]).reshape(-1)


# ------------------------------------------------------------------------------------------------- jitter

@dataclasses.dataclass(frozen=True)
class JitterSpec:
    max_pad: int = 30
    max_zoom: float = 2.0
    flips: bool = True


def sample_jitter(key, batch: int, size: int, spec: JitterSpec) -> dict:
    """Per image: zoom (1 with prob .5, else U[1, max_zoom)), crop offsets (row, col) into the zoomed padded image,
    h-flip with prob .5 — FeatUp's `sample_transform` (which draws one for the whole batch)."""
    k_apply, k_zoom, k_row, k_col, k_flip = jax.random.split(key, 5)
    apply_zoom = jax.random.uniform(k_apply, (batch,)) > 0.5
    zoom = jnp.where(apply_zoom, jax.random.uniform(k_zoom, (batch,)) * (spec.max_zoom - 1.0) + 1.0, 1.0)
    zoomed = jnp.floor((size + 2 * spec.max_pad) * zoom).astype(jnp.int32)   # int((h + 2p) * zoom)
    valid = zoomed - size + 1
    row = jnp.floor(jax.random.uniform(k_row, (batch,)) * valid).astype(jnp.int32)
    col = jnp.floor(jax.random.uniform(k_col, (batch,)) * valid).astype(jnp.int32)
    flip = (jax.random.uniform(k_flip, (batch,)) > 0.5) if spec.flips else jnp.zeros((batch,), bool)
    return {"zoom": zoom.astype(jnp.float32), "row": row, "col": col, "flip": flip}


def jitter_matrices(params: dict, size: int, spec: JitterSpec):
    """Per image, the (size, size + 2 max_pad) row and column matrices of zoom -> crop (-> h-flip) applied to the
    reflect-padded map: jittered = rows @ padded @ cols^T. Two bilinear taps per output pixel, torch's rule with a
    given scale factor (source = (z + .5) / zoom - .5, clamped at 0; as the CUDA kernel rounds it)."""
    padded = size + 2 * spec.max_pad

    def axis(offset, flip):
        dst = jnp.arange(size)[None, :]
        if flip is not None:
            dst = jnp.where(flip[:, None], size - 1 - dst, dst)
        z = (offset[:, None] + dst).astype(jnp.float32)
        zoom = params["zoom"][:, None]
        src = jnp.where(zoom > 1.0, jnp.maximum((z + 0.5) * (1.0 / zoom) - 0.5, 0.0), z)
        i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), padded - 1)
        i1 = jnp.minimum(i0 + 1, padded - 1)
        w1 = (src - i0.astype(jnp.float32))[..., None]
        return (jax.nn.one_hot(i0, padded, dtype=jnp.float32) * (1.0 - w1)
                + jax.nn.one_hot(i1, padded, dtype=jnp.float32) * w1)

    return axis(params["row"], None), axis(params["col"], params["flip"])


def separable_apply(rows, x, cols):
    """rows (B, I, P) @ x (B, P, Q, C) @ cols (B, J, Q)^T, rows first. Spelled as two contractions: a single
    three-operand einsum may pair rows with cols first, a (B, I, P, J, Q) intermediate (72 GiB at 16 x 336^2)."""
    return jnp.einsum("biqc,bjq->bijc", jnp.einsum("bip,bpqc->biqc", rows, x), cols)


def apply_jitter(x, params: dict, spec: JitterSpec):
    """x (B, S, S, C) -> the jittered view (B, S, S, C): FeatUp's `apply_jitter` (reflect pad by max_pad, bilinear
    zoom when zoom > 1, crop at (row, col), optional h-flip), each image with its own parameters."""
    p = spec.max_pad
    rows, cols = jitter_matrices(params, x.shape[1], spec)
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    return separable_apply(rows, padded, cols)


# ------------------------------------------------------------------------------------------------- modules

def patch_rows_matrix(size: int, kernel: int, final: int) -> np.ndarray:
    """(final * kernel, size): the downsampler's blur followed by the selection of its patches' rows (or columns)."""
    return blur_matrix(size)[patch_index(size, kernel, final)]


def patchify(x, kernel: int, final: int):
    """(B, f * k, f * k, ...) -> (B, f, f, k * k, ...), tap p = row * k + col."""
    b, rest = x.shape[0], x.shape[3:]
    x = x.reshape(b, final, kernel, final, kernel, *rest)
    return jnp.moveaxis(x, 3, 2).reshape(b, final, final, kernel * kernel, *rest)


def dropout_scores(key, rows, hr, cols, weight, rate: float):
    """sum_c weight[c] * dropout(grid)[b, i, j, c], grid = rows @ hr @ cols^T per image (B, I, J, C), float32.

    Dropout masks every channel of every pixel of the full-resolution grid, so these scores cannot be taken on a
    projection of hr as the rest of the downsampler is. One image at a time and rematerialised: only one image's
    grid and mask exist at once, in the forward and the backward pass (at 336^2 x 1024 channels, 0.46 GB each in
    float32, where the whole batch's grid, mask and dropped copy were kept for the backward pass)."""
    keep = 1.0 - rate

    @jax.checkpoint
    def one(args):
        i, r, x, c = args
        grid = separable_apply(r[None], x[None], c[None])[0]
        mask = jax.random.bernoulli(jax.random.fold_in(key, i), keep, grid.shape)
        return jnp.einsum("ijc,c->ij", jnp.where(mask, grid / keep, 0.0), weight)

    return jax.lax.map(one, (jnp.arange(hr.shape[0]), rows, hr.astype(jnp.float32), cols))


class AttentionDownsampler(nn.Module):
    """FeatUp's `AttentionDownsampler(dim, kernel_size, final_size, blur_attn=True)`: blur 5x5 (sigma 1), take
    kernel x kernel patches at stride (S - k) // (final - 1), score each pixel with Linear(C -> 1) after dropout .2,
    zero the scores of 20% of output cells in training (not rescaled, as the original), `* w + b` (learned k x k),
    softmax over the patch, weighted sum."""

    kernel_size: int
    final_size: int
    dropout: float = 0.2

    @nn.compact
    def __call__(self, hr, deterministic: bool = True, rows=None, cols=None, values=None):
        """hr (B, h, w, C) -> (B, f, f, C'). The blurred map is `rows @ hr @ cols^T` per image (B, f * k, h) and
        (B, f * k, w) - by default the blur and patch selection of a square hr; the objective composes its resize and
        jitter into them. `values` (B, h, w, C'), default hr: what the attention averages, any per-pixel linear map
        of hr (the objective's random projection). The weighted sum is linear, so averaging projected values equals
        FeatUp's projecting the average, and the full-resolution grid never exists in C channels (in training,
        only one image at a time for the dropout's scores)."""
        b, h, w, c = hr.shape
        k, f = self.kernel_size, self.final_size
        if rows is None:
            if h != w:
                raise ValueError(f"the attention downsampler takes square maps, got {h}x{w}")
            rows = cols = jnp.broadcast_to(jnp.asarray(patch_rows_matrix(h, k, f), jnp.float32), (b, f * k, h))
        values = hr if values is None else values
        net = conv1x1(1, "attention_net_1", dtype=jnp.float32, param_dtype=jnp.float32)
        net(jnp.zeros((1, c), jnp.float32))   # creates its parameters: the scores below use them as arrays
        linear = nn.meta.unbox(net.variables["params"])
        weight, bias = linear["kernel"][:, 0], linear["bias"][0]
        if deterministic:
            scores = separable_apply(rows, (hr.astype(jnp.float32) @ weight)[..., None], cols)[..., 0]
        else:
            # `attention_net_0`, FeatUp's Dropout(.2) before the scoring Linear
            scores = dropout_scores(self.make_rng("dropout"), rows, hr, cols, weight, self.dropout)
        logits = patchify(scores + bias, k, f)                                            # (B, f, f, k * k)
        if not deterministic:
            keep = jax.random.uniform(self.make_rng("dropout"), (b, f, f, 1)) > self.dropout
            logits = logits * keep
        init = lambda base: lambda key, shape: base + 0.01 * jax.random.normal(key, shape)  # noqa: E731
        wk = self.param("w", init(1.0), (k, k))
        bk = self.param("b", init(0.0), (k, k))
        attention = jax.nn.softmax(logits * wk.reshape(-1) + bk.reshape(-1), axis=-1)
        patches = patchify(separable_apply(rows, values.astype(jnp.float32), cols), k, f)   # (B, f, f, k * k, C')
        return jnp.einsum("bhwpc,bhwp->bhwc", patches, attention)


class ScaleNet(nn.Module):
    """Per-pixel uncertainty s = clamp(exp(Conv1x1(C -> 1)(lr_feats) + .1), 1e-4); init 0.1x torch's default."""

    @nn.compact
    def __call__(self, feats):
        c = feats.shape[-1]
        bound = 0.1 / np.sqrt(c)
        init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa
        kernel = self.param("kernel", init, (c, 1))
        bias = self.param("bias", init, (1,))
        return jnp.maximum(jnp.exp(feats.astype(jnp.float32) @ kernel + bias + 0.1), 1e-4)


@dataclasses.dataclass(frozen=True)
class CRFSpec:
    weight: float = 0.001
    alpha: float = 0.1
    beta: float = 0.15
    gamma: float = 0.005
    w1: float = 10.0
    w2: float = 3.0
    shift: float = 0.0
    samples: int = 1000


def crf_loss(guidance, features_at, coords, spec: CRFSpec):
    """FeatUp's `SampledCRFLoss` on pixels `coords` (n, 2) (row, col) shared by the batch: mean over pairs of
    |f_i - f_j|^2 * (w1 exp(-|p_i - p_j|^2 / 2a - |I_i - I_j|^2 / 2b) + w2 exp(-|p_i - p_j|^2 / 2g) - shift).
    `features_at` (B, n, D): the feature map at those pixels."""
    h, w = guidance.shape[1], guidance.shape[2]
    norm = coords.astype(jnp.float32) / jnp.asarray([h, w], jnp.float32)
    coord_diff = jnp.sum((norm[:, None, :] - norm[None, :, :]) ** 2, axis=-1)[None]          # (1, n, n)
    g = guidance[:, coords[:, 0], coords[:, 1]].astype(jnp.float32)                          # (B, n, 3)
    f = features_at.astype(jnp.float32)
    guidance_diff = jnp.sum((g[:, :, None] - g[:, None, :]) ** 2, axis=-1)
    kernel = (spec.w1 * jnp.exp(-coord_diff / (2 * spec.alpha) - guidance_diff / (2 * spec.beta))
              + spec.w2 * jnp.exp(-coord_diff / (2 * spec.gamma)) - spec.shift)
    sq = jnp.sum(f * f, axis=-1)
    feat_diff = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2 * jnp.einsum("bnd,bmd->bnm", f, f), 0.0)
    return jnp.mean(feat_diff * kernel)


def random_projection(key, batch: int, dim: int, out_dim: int):
    """(B, C, out_dim) Gaussian, each column unit-norm over C (FeatUp's `proj /= proj.square().sum(1).sqrt()`)."""
    proj = jax.random.normal(key, (batch, dim, out_dim))
    return proj / jnp.sqrt(jnp.sum(proj ** 2, axis=1, keepdims=True))


def channel_norm(feats, eps: float = 1e-5):
    """FeatUp's ChannelNorm at its initial (never trained) affine: LayerNorm over channels."""
    x = feats.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


@dataclasses.dataclass(frozen=True)
class VDIMSpec:
    """The objective's hyper-parameters (spec §4.4 defaults)."""

    n_jitters: int = 2
    jitter: JitterSpec = JitterSpec()
    proj_dim: int = 30
    crf: CRFSpec = CRFSpec()
    downsampler_dropout: float = 0.2


class VDIMObjective(nn.Module):
    """Parameters: `upsampler` (the JBU 4x stack LLaVA uses), `downsampler_{2,4}x`, `scale_net_{2,4}x`.

    `__call__(image, lr_feats, views)`: image (B, S, S, 3) normalised, lr_feats (B, g, g, C) the frozen ViT's
    features of it, `views` one dict per jitter: its parameters (`sample_jitter`), `lr_feats` of the jittered image,
    `proj` (B, C, d) and `crf_coords` (n, 2). Returns (total loss, metrics)."""

    patch_size: int
    grid: int
    spec: VDIMSpec = VDIMSpec()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image, lr_feats, views: list, deterministic: bool = True):
        s = self.spec
        size = image.shape[1]
        upsampler = JBU4xStack(name="upsampler")
        downsamplers = {lv: AttentionDownsampler(self.patch_size, self.grid, s.downsampler_dropout,
                                                 name=f"downsampler_{lv}x") for lv in LEVELS}
        scale_nets = {lv: ScaleNet(name=f"scale_net_{lv}x") for lv in LEVELS}
        n = len(views)
        metrics = {f"{kind}_{lv}x": 0.0 for kind in ("rec", "crf") for lv in LEVELS}
        total = 0.0
        # resize to the image -> reflect pad -> zoom/crop/flip -> (downsampler) blur + patch grid: all linear and
        # separable, so one (B, S, h) matrix per axis replaces four passes over (B, S, S, C) maps. The jitter-free
        # parts are constants: resize + pad per level (S + 2p, h), blur + patch rows (f * k, S).
        pad = pad_matrix(size, s.jitter.max_pad)
        to_padded = {lv: jnp.asarray(pad @ bilinear_matrix(lv * lr_feats.shape[1], size), jnp.float32)
                     for lv in LEVELS}
        patch_rows = jnp.asarray(patch_rows_matrix(size, self.patch_size, self.grid), jnp.float32)
        for i, view in enumerate(views):
            # FeatUp recomputes the upsampled maps per jitter (fresh dropout); the 4x stage learns on a detached 2x.
            s2, s4 = upsampler(lr_feats, image, deterministic, stage_stop_gradient=True)
            proj = view["proj"]
            target = jnp.einsum("bhwc,bcd->bhwd", view["lr_feats"].astype(jnp.float32), proj)
            rows, cols = jitter_matrices(view["params"], size, s.jitter)                    # (B, S, S + 2p)
            for lv, hr in ((2, s2), (4, s4)):
                r_map, c_map = rows @ to_padded[lv], cols @ to_padded[lv]                           # (B, S, h)
                hr_proj = jnp.einsum("bhwc,bcd->bhwd", hr.astype(jnp.float32), proj)
                down = downsamplers[lv](hr, deterministic, rows=patch_rows @ r_map, cols=patch_rows @ c_map,
                                        values=hr_proj)
                scales = scale_nets[lv](view["lr_feats"])
                rec = jnp.mean((down - target) ** 2 / (2 * scales ** 2) + jnp.log(scales)) / n
                metrics[f"rec_{lv}x"] += rec
                total = total + rec
                if i == 0 and s.crf.weight > 0:
                    # As the original: the guidance is the un-jittered image, the features the jittered map.
                    coords = view["crf_coords"]
                    at = jnp.einsum("bnqd,bnq->bnd", jnp.einsum("bnp,bpqd->bnqd", r_map[:, coords[:, 0]], hr_proj),
                                    c_map[:, coords[:, 1]])
                    crf = crf_loss(image, at, coords, s.crf)
                    metrics[f"crf_{lv}x"] += crf
                    total = total + s.crf.weight * crf
        return total, metrics
