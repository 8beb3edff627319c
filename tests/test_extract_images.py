"""Image listing and robust loading: every bad file has a reason, odd valid files are used."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.images import BadImage, InputError, list_images, load_image, to_rgb
from tests.utils import photo


def write_bad_images(folder: Path) -> dict[str, str]:
    """One file per kind of unusable image; returns name -> expected words of the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    Image.fromarray(photo("chelsea", 120)).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(_png_header(30000, 30000))
    (folder / "dangling.jpg").symlink_to(folder / "does-not-exist.jpg")
    return {"empty.jpg": "empty file", "truncated.jpg": "unreadable image data", "text.png": "not an image",
            "bomb.png": "decompression bomb", "dangling.jpg": "dangling symbolic link"}


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG file claiming a huge image (Pillow refuses it on open, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Valid images in unusual modes; returns name -> displayed (w, h)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(photo("astronaut", 96))
    rgb.convert("L").save(folder / "gray.png")
    Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(folder / "sixteen.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.gif")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees for display
    rgb.resize((96, 64)).save(folder / "rotated.jpg", exif=exif)
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    return {"gray.png": (96, 96), "sixteen.png": (96, 96), "rgba.png": (96, 96), "palette.gif": (96, 96),
            "cmyk.jpg": (96, 96), "rotated.jpg": (64, 96), "animated.gif": (64, 64)}


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
