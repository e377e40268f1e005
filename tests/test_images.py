"""Image loading: EXIF orientation and every pixel mode a LLaVA-format dataset contains."""
import numpy as np
import pytest
from PIL import Image

from uhd_jax.data.images import SampleError, load_image


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_image(str(tmp_path / "r.jpg"))
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue band is now on top


def test_alpha_modes_drop_or_composite(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent
    rgba.save(tmp_path / "a.png")
    assert np.asarray(load_image(str(tmp_path / "a.png")))[0, 0].tolist() == [10, 20, 30]  # the originals' convert
    assert np.asarray(load_image(str(tmp_path / "a.png"), alpha="white"))[0, 0].tolist() == [255, 255, 255]
    Image.new("LA", (8, 8), (100, 255)).save(tmp_path / "la.png")
    assert np.asarray(load_image(str(tmp_path / "la.png")))[0, 0].tolist() == [100, 100, 100]


def test_palette_cmyk_and_16_bit(tmp_path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert np.asarray(load_image(str(tmp_path / "p.png")))[0, 0].tolist() == [200, 10, 10]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    red = np.asarray(load_image(str(tmp_path / "c.jpg")))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    deep = np.full((8, 8), 65535 // 2, np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    mid = np.asarray(load_image(str(tmp_path / "d.png")))[0, 0]
    assert load_image(str(tmp_path / "d.png")).mode == "RGB" and 120 <= mid[0] <= 135  # scaled, not clipped to 255


def test_truncated_file_is_a_sample_error(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError, match="cannot decode image .*t.png"):
        load_image(str(tmp_path / "t.png"))


def test_truncated_file_is_an_error_where_pil_was_told_to_load_truncated_images(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)   # lmms-eval's task module sets it on import
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError, match="cannot decode image .*t.png"):
        load_image(str(tmp_path / "t.png"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True   # the process's setting is left as it was
