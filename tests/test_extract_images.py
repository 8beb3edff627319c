"""Image listing and robust loading: every bad file has a reason, odd valid files are used."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.extraction.images import BadImage, InputError, list_images, load_image, to_rgb
from tests.utils import write_bad_images, write_odd_images


def test_bad_images_raise_with_reason(tmp_path: Path):
    for name, words in write_bad_images(tmp_path).items():
        with pytest.raises(BadImage, match=words):
            load_image(tmp_path / name)


def test_odd_images_load_as_rgb(tmp_path: Path):
    for name, size in write_odd_images(tmp_path).items():
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == size, name
    gray = np.asarray(load_image(tmp_path / "gray.png"))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "sixteen.png")), gray)  # scaled, not clipped
    assert np.asarray(load_image(tmp_path / "animated.gif"))[0, 0].tolist() == [255, 0, 0]  # first frame


def test_high_bit_depth_is_scaled_not_clipped():
    a = np.array([[0, 32896, 65535]], np.uint16)
    assert np.asarray(to_rgb(Image.fromarray(a)))[0, :, 0].tolist() == [0, 128, 255]
    f = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert np.asarray(to_rgb(Image.fromarray(f, "F")))[0, :, 0].tolist() == [0, 128, 255]


def test_list_folder_recursive_any_case(tmp_path: Path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for rel in ("b/c/z.JPG", "a.png", "b/y.Jpeg"):
        Image.new("RGB", (40, 40)).save(tmp_path / rel, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [name for name, _ in list_images(tmp_path)] == ["a.png", "b/c/z.JPG", "b/y.Jpeg"]


def test_list_file(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "imgs" / "x.png")
    (tmp_path / "list.txt").write_text("# queries\nimgs/x.png\n\n./imgs/missing.png\n")
    assert list_images(tmp_path / "list.txt") == [("imgs/missing.png", tmp_path / "imgs/missing.png"),
                                                  ("imgs/x.png", tmp_path / "imgs/x.png")]
    (tmp_path / "bad.txt").write_text("../outside.png\n")
    with pytest.raises(InputError, match="bad.txt:1"):
        list_images(tmp_path / "bad.txt")


def test_list_errors(tmp_path: Path):
    with pytest.raises(InputError, match="no such folder"):
        list_images(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no images found"):
        list_images(tmp_path)


def test_crop_is_in_stored_pixels_before_the_exif_orientation(tmp_path: Path):
    """revisitop's query boxes are in stored-pixel coordinates: a crop of an image stored with
    EXIF orientation 6 (turn 90 degrees clockwise for display) is cut from the stored pixels and
    then turned upright."""
    stored = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)  # 100 wide, 60 high
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "q.png", exif=exif)  # PNG: lossless, so pixels compare exactly
    assert load_image(tmp_path / "q.png").size == (60, 100)
    x1, y1, x2, y2 = 55, 10, 95, 30
    got = np.asarray(load_image(tmp_path / "q.png", crop=[x1, y1, x2, y2]))
    expected = np.rot90(stored[y1:y2, x1:x2], k=-1)  # the stored crop, turned clockwise
    assert got.shape == (40, 20, 3)
    np.testing.assert_array_equal(got, expected)
