"""CLIP ViT: HF parity at layer -2, torch-bicubic position interpolation for non-square slices, packed sequences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.torch_helpers import random_pixels, rel_err, tiny_clip, to_nchw
from uhd_jax.convert.importer import Source, import_checkpoint
from uhd_jax.convert.hf_configs import vision_from_hf
from uhd_jax.data.packing import pack_images_for_vit
from uhd_jax.models.config import vit_config
from uhd_jax.models.interpolate import position_taps, torch_bicubic_matrix
from uhd_jax.models.vit import VisionTransformer


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    ref = tiny_clip(seed=1)
    d = tmp_path_factory.mktemp("clip")
    ref.save_pretrained(d)
    model = {"vision": vision_from_hf(ref.config.to_dict()), "dtype": "float32"}
    params, _ = import_checkpoint([Source(str(d))], model)
    return ref, VisionTransformer(vit_config(model)), {"params": params["vision"]}


def torch_layer_minus2(ref, pixels, interpolate=False):
    with torch.no_grad():
        out = ref(pixel_values=to_nchw(pixels), output_hidden_states=True, interpolate_pos_encoding=interpolate)
    return out.hidden_states[-2][:, 1:].numpy()


def test_clip_layer_minus2_matches_transformers(clip_pair):
    ref, vit, params = clip_pair
    pixels = random_pixels(2, 56, 56, seed=2)
    ours = vit.apply(params, jnp.asarray(pixels))
    assert ours.shape == (2, 16, 32)
    assert rel_err(ours, torch_layer_minus2(ref, pixels)) <= 1e-5


@pytest.mark.parametrize("in_size,out_size", [(4, 3), (4, 7), (24, 17), (24, 46), (12, 24), (5, 5)])
def test_bicubic_matrix_equals_torch_interpolate(in_size, out_size):
    grid = np.random.default_rng(0).normal(size=(in_size, in_size)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(grid)[None, None], size=(out_size, in_size + 1), mode="bicubic",
                        align_corners=False)[0, 0].numpy()
    m_rows = torch_bicubic_matrix(in_size, out_size)
    m_cols = torch_bicubic_matrix(in_size, in_size + 1)
    assert rel_err(m_rows @ grid @ m_cols.T, ref) <= 1e-6


def test_bicubic_differs_from_jax_image_resize():
    """Documents why the explicit kernel exists: jax's cubic (a=-0.5) is not torch's (a=-0.75)."""
    grid = np.random.default_rng(0).normal(size=(24, 24)).astype(np.float32)
    ours = torch_bicubic_matrix(24, 40) @ grid @ torch_bicubic_matrix(24, 30).T
    theirs = np.asarray(jax.image.resize(grid, (40, 30), "cubic"))
    assert rel_err(theirs, ours) > 1e-3


def test_non_square_slice_interpolates_position_embeddings_like_torch(clip_pair):
    ref, vit, params = clip_pair
    pixels = random_pixels(2, 42, 70, seed=3)  # 3 x 5 patches from a 4 x 4 table
    ours = vit.apply(params, jnp.asarray(pixels))
    assert ours.shape == (2, 15, 32)
    assert rel_err(ours, torch_layer_minus2(ref, pixels, interpolate=True)) <= 1e-5


def test_position_taps_reproduce_the_dense_resize():
    grid = np.random.default_rng(1).normal(size=(4, 4, 3))
    idx, w = position_taps(4, (3, 7))
    taps = (w[..., None] * grid.reshape(16, 3)[idx]).sum(1)
    dense = np.einsum("yi,xj,ijd->yxd", torch_bicubic_matrix(4, 3), torch_bicubic_matrix(4, 7), grid)
    np.testing.assert_allclose(taps, dense.reshape(21, 3), rtol=0, atol=1e-6)


def test_packed_slices_equal_each_slice_alone(clip_pair):
    _, vit, params = clip_pair
    sizes = [[(56, 56), (28, 70)], [(42, 42)]]
    images = [[random_pixels(1, h, w, seed=10 * r + k)[0] for k, (h, w) in enumerate(row)]
              for r, row in enumerate(sizes)]
    packed = pack_images_for_vit(images, budget=40, patch=14, grid=4)
    hidden = vit.apply(params, jax.tree_util.tree_map(jnp.asarray, packed), method=VisionTransformer.encode_packed)
    for r, row in enumerate(images):
        offset = 0
        for img in row:
            n = (img.shape[0] // 14) * (img.shape[1] // 14)
            alone = vit.apply(params, jnp.asarray(img[None]))[0]
            assert rel_err(hidden[r, offset + 1:offset + 1 + n], alone) <= 1e-5
            offset += 1 + n
        assert not packed.segment_ids[r, offset:].any()  # the rest of the row is padding


def test_packing_refuses_to_truncate():
    img = np.zeros((56, 56, 3), np.float32)
    with pytest.raises(ValueError, match="row 0: images need 34 vision-token slots, more than data.patch_budget=20"):
        pack_images_for_vit([[img, img]], budget=20, patch=14, grid=4)
