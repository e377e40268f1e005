"""LLaVA-1.5 host preprocessing against transformers' CLIPImageProcessor (PIL backend) and the spec's pad rule."""
import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from uhd_jax.data.image_processing import (CLIP_MEAN, CLIP_STD, LLAVA_PAD_COLOR, clip_preprocess, expand_to_square,
                                           llava15_image, normalize)


def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8))


def test_pad_color_is_the_clip_mean_in_bytes():
    assert LLAVA_PAD_COLOR == (122, 116, 104)


@pytest.mark.parametrize("w,h", [(500, 300), (300, 500), (336, 336), (1000, 77), (51, 40)])
def test_clip_preprocess_equals_clip_image_processor(w, h):
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
                              image_mean=[0.48145466, 0.4578275, 0.40821073],
                              image_std=[0.26862954, 0.26130258, 0.27577711])
    img = random_image(w, h)
    ref = proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(clip_preprocess(img), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_normalize_is_the_processors_float32_arithmetic_bit_for_bit(mode):
    # every byte value in every channel, then the per-pixel float32 rescale and normalise of CLIPImageProcessor
    ramp = np.stack([np.arange(256), np.arange(256)[::-1], (np.arange(256) * 7) % 256], -1).astype(np.uint8)
    img = Image.fromarray(np.tile(ramp[None], (3, 1, 1))).convert(mode)
    mean, std = [0.5, 0.25, 0.125], [0.2, 0.3, 0.4]
    rgb = np.asarray(img.convert("RGB"), np.float32) * np.float32(1 / 255)
    for m, s in ((CLIP_MEAN, CLIP_STD), (mean, std)):
        want = (rgb - np.asarray(m, np.float32)) / np.asarray(s, np.float32)
        got = normalize(img, m, s)
        assert got.dtype == np.float32 and got.shape == (3, 256, 3)
        np.testing.assert_array_equal(got, want)


def test_expand_to_square_centres_the_image():
    img = Image.new("RGB", (6, 2), (255, 0, 0))
    sq = np.asarray(expand_to_square(img))
    assert sq.shape == (6, 6, 3)
    assert (sq[:2] == LLAVA_PAD_COLOR).all() and (sq[2:4] == (255, 0, 0)).all() and (sq[4:] == LLAVA_PAD_COLOR).all()
    tall = np.asarray(expand_to_square(Image.new("RGB", (1, 3), (0, 0, 255))))
    assert (tall[:, 1] == (0, 0, 255)).all() and (tall[:, 0] == LLAVA_PAD_COLOR).all()


def test_llava15_pad_keeps_the_whole_image():
    img = random_image(400, 200)
    padded = llava15_image(img, aspect="pad")
    cropped = llava15_image(img, aspect="square")
    assert padded.shape == cropped.shape == (336, 336, 3)
    # 'pad' shrinks the whole image into the middle band; the top rows are the pad colour.
    np.testing.assert_allclose(padded[0, 0], clip_preprocess(Image.new("RGB", (8, 8), LLAVA_PAD_COLOR))[0, 0],
                               atol=1e-6)
    with pytest.raises(ValueError, match="anyres"):
        llava15_image(img, aspect="anyres")
