"""Helpers of the UHD tests: numpy references written from the spec (uhd.md §2.2: torchvision RoIAlign, the 12x12
windows) and the tiny UHD configs over the synthetic dataset."""
import math

import numpy as np

from uhd_jax.models.projectors.windows import pooled_size


def roi_align_reference(fmap, box, ph, pw):
    """torchvision roi_align(aligned=False, sampling_ratio=-1, spatial_scale=1) for one box, written from its CPU
    kernel's description: fmap (C, H, W) float32, box (x1, y1, x2, y2) float32 -> (C, ph, pw)."""
    f32 = np.float32
    c, height, width = fmap.shape
    x1, y1, x2, y2 = (f32(v) for v in box)
    roi_w, roi_h = max(f32(x2 - x1), f32(1)), max(f32(y2 - y1), f32(1))
    bin_h, bin_w = f32(roi_h / f32(ph)), f32(roi_w / f32(pw))
    gh, gw = math.ceil(roi_h / ph), math.ceil(roi_w / pw)
    out = np.zeros((c, ph, pw), np.float64)
    for r in range(ph):
        for q in range(pw):
            acc = np.zeros(c, np.float64)
            for iy in range(gh):
                y = f32(f32(y1 + f32(f32(r) * bin_h)) + f32(f32(f32(iy + 0.5) * bin_h) / f32(gh)))
                for ix in range(gw):
                    x = f32(f32(x1 + f32(f32(q) * bin_w)) + f32(f32(f32(ix + 0.5) * bin_w) / f32(gw)))
                    if y < -1.0 or y > height or x < -1.0 or x > width:
                        continue
                    yy, xx = max(y, f32(0)), max(x, f32(0))
                    y_lo, x_lo = int(yy), int(xx)
                    if y_lo >= height - 1:
                        y_lo = y_hi = height - 1
                        yy = f32(y_lo)
                    else:
                        y_hi = y_lo + 1
                    if x_lo >= width - 1:
                        x_lo = x_hi = width - 1
                        xx = f32(x_lo)
                    else:
                        x_hi = x_lo + 1
                    ly, lx = yy - y_lo, xx - x_lo
                    hy, hx = 1 - ly, 1 - lx
                    acc += (hy * hx * fmap[:, y_lo, x_lo] + hy * lx * fmap[:, y_lo, x_hi]
                            + ly * hx * fmap[:, y_hi, x_lo] + ly * lx * fmap[:, y_hi, x_hi])
            out[:, r, q] = acc / max(gh * gw, 1)
    return out


def window_edges_reference(length, grid=12):
    """Spec §2.2: window size length/12 as a Python float, start = i * size, end = start + size, one float32 cast of
    the finished values (torch.tensor(..., float32))."""
    size = length / grid
    starts = [i * size for i in range(grid)]
    return np.array(starts, np.float32), np.array([s + size for s in starts], np.float32)


def windows_reference(fmap, grid=12):
    """All grid x grid windows of a map: (grid^2, ph*pw, C), boxes built as the original builds them."""
    c, h, w = fmap.shape
    ph, pw = pooled_size(h, w)
    y0, y1 = window_edges_reference(h, grid)
    x0, x1 = window_edges_reference(w, grid)
    out = []
    for i in range(grid):
        for j in range(grid):
            out.append(roi_align_reference(fmap, (x0[j], y0[i], x1[j], y1[i]), ph, pw).reshape(c, -1).T)
    return np.stack(out)


def tiny_uhd(data, spec: str = "configs/uhd_v1.py:tiny", steps: int = 6):
    """A tiny UHD experiment on the session's synthetic dataset and the 2x2x2 test mesh."""
    from tests.config_helpers import on_synthetic_data

    c = on_synthetic_data(spec, data, batch_size=4, num_steps=steps, save_every=100)
    if "jbu" in c.stages:
        c.stages.jbu.update(sources=[dict(image_folder="images/train")], batch_size=4, num_steps=steps, save_every=100)
    return c


def convert_state(state: dict, shapes, table, skip: str | None = None, prefix: str = ""):
    """Our parameters from a torch state dict through a converter rule table: every key maps onto exactly the
    parameters the module declares (and back), or matches the `skip` regex (applied to prefix + key).
    Returns (nested params, skipped keys)."""
    import re

    import flax.linen as nn

    from uhd_jax.train.param_tree import flatten, unflatten

    targets = flatten(nn.meta.unbox(shapes))
    params, skipped = {}, []
    for key, value in state.items():
        rule = next((r for r in table if r.match_torch(key) is not None), None)
        path = rule.match_torch(key) if rule else None
        if path not in targets:
            assert skip and re.search(skip, prefix + key), key
            skipped.append(key)
            continue
        params[path] = rule.transform.to_ours(value.detach().numpy(), targets[path].shape)
        assert rule.match_ours(path) == key  # the table reads both ways
    assert set(params) == set(targets)
    return unflatten(params), skipped
