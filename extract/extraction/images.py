"""Finding images and opening them robustly: every failure becomes a :class:`BadImage` with a reason."""
from __future__ import annotations

import posixpath
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from train.dataloader import upright

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".jpe", ".jfif"})


class BadImage(Exception):
    """An image file that cannot be used; ``str(e)`` is the reason."""


class InputError(Exception):
    """``--input_path`` is missing, empty, or a list with unusable lines."""


def list_images(input_path: str | Path) -> list[tuple[str, Path]]:
    """(name, path) of every image under ``input_path``, sorted by name.

    ``input_path`` is a folder (searched recursively for image extensions, any case; names are
    '/'-separated paths relative to it) or a text file listing one image path per line relative
    to the file's folder (blank lines and '#' comments ignored; names are those paths). Dangling
    links are listed, so that they are reported rather than silently missed.
    """
    root = Path(input_path)
    if root.is_dir():
        items = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                 if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())]
    elif root.is_file():
        items = _read_list(root)
    else:
        raise InputError(f"{root}: no such folder or image list")
    if not items:
        raise InputError(f"{root}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(items)


def image_path(input_path: str | Path, name: str) -> Path:
    """The file of image ``name`` of :func:`list_images`'s ``input_path`` (a folder, or an image
    list whose names are relative to its folder)."""
    root = Path(input_path)
    return (root if root.is_dir() else root.parent) / name


def _read_list(list_file: Path) -> list[tuple[str, Path]]:
    items = {}
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        name = posixpath.normpath(entry.replace("\\", "/"))
        if posixpath.isabs(name) or name.split("/")[0] == "..":
            raise InputError(f"{list_file}:{number}: {entry!r} must be a path relative to {list_file.parent}, "
                             "inside it")
        items[name] = list_file.parent / name
    return list(items.items())


def load_image(path: str | Path, crop: Sequence[float] | None = None) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image, as displayed (EXIF orientation applied;
    first frame of an animation). Raises :class:`BadImage` with the reason when it is unusable.

    ``crop`` [x1, y1, x2, y2] is in pixels of the image as stored (before the EXIF orientation,
    as revisitop's query boxes): the crop is taken first, then turned upright."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise BadImage(f"dangling symbolic link (to {path.readlink()})")
    if not path.is_file():
        raise BadImage("no such file")
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF / palette-transparency chatter
            with Image.open(path) as img:
                img.load()
                if crop is not None:
                    img = img.crop(tuple(float(v) for v in crop))  # keeps the EXIF block
                return to_rgb(upright(img))
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (format not recognised)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated / corrupt data, odd modes
        raise BadImage(f"unreadable image data ({type(e).__name__}: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. Higher bit depths (I;16*, I, F) are scaled to 0..255 from their
    full range, not clipped; alpha is dropped; palette, grayscale, CMYK, YCbCr are converted."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        peak = a.max(initial=0)
        full = 65535.0 if img.mode.startswith("I;16") or peak > 255 else 255.0
        if img.mode == "F" and peak <= 1.0:
            full = 1.0
        full = max(full, peak)
        a = np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")


def fit_size(width: int, height: int, max_image_size: int) -> tuple[int, int]:
    """(w, h) after shrinking so that the longest side is at most ``max_image_size`` (0: no limit)."""
    longest = max(width, height)
    if max_image_size <= 0 or longest <= max_image_size:
        return width, height
    m = max_image_size / longest
    return max(1, round(width * m)), max(1, round(height * m))


def shrink(image: torch.Tensor, max_image_size: int) -> torch.Tensor:
    """A (3, H, W) image shrunk so that its longest side is at most ``max_image_size`` (bilinear,
    ``align_corners=False``, antialiased); returned as is when already small enough.

    uint8 stays uint8 on the CPU (a quarter of the memory of float, and torch's fastest path).
    PyTorch has no antialiased uint8 kernel elsewhere: there a uint8 image is first converted to
    float in [0, 1]."""
    height, width = image.shape[-2:]
    w, h = fit_size(width, height, max_image_size)
    if (w, h) == (width, height):
        return image
    if image.dtype == torch.uint8 and image.device.type != "cpu":
        image = image.float() / 255
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


def resize_tf1(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float -> (C, h, w) as TF1's ``resize_bilinear`` (align_corners=False,
    half_pixel_centers=False), the official DELF extractor's pyramid: output cell i samples input
    position i * (H / h) (float32; no half-pixel shift, no antialiasing), between its floor and the
    next cell, clamped to the last. The interpolation tables are made on the image's device (no
    copy from the host, so no wait for a GPU)."""
    out = image
    # columns first, then rows: TF's order of the two interpolations
    for dim, (n_in, n_out) in ((2, (image.shape[2], size[1])), (1, (image.shape[1], size[0]))):
        if n_in == n_out:
            continue
        ratio = float(np.float32(n_in) / np.float32(n_out))  # the float32 quotient (a float32 multiplier below)
        where = torch.arange(n_out, dtype=torch.float32, device=image.device) * ratio
        low = where.floor()
        lerp = (where - low).to(image.dtype)
        low = low.long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        shape = [1, 1, 1]
        shape[dim] = n_out
        a, b = out.index_select(dim, low), out.index_select(dim, high)
        out = torch.lerp(a, b, lerp.view(shape))  # TF computes a + (b - a) * lerp: equal to rounding
    return out


Decoded = tuple[str, Path, torch.Tensor | None, tuple[int, int] | None, str | None]


class ImageDataset(torch.utils.data.Dataset):
    """Decodes images for a DataLoader: item = (name, path, uint8 tensor (3, h, w) or None,
    original (width, height) or None, reason or None). With ``max_image_size`` the tensor is
    already shrunk to it (:func:`shrink`), so that the decoding processes do that work too.
    ``crops`` maps names to a crop box [x1, y1, x2, y2] (see :func:`load_image`); the original
    size is then the crop's. Failures come back as reasons, never as exceptions."""

    def __init__(self, items: list[tuple[str, Path]], max_image_size: int | None = None,
                 crops: Mapping[str, Sequence[float]] | None = None) -> None:
        self.items, self.max_image_size, self.crops = items, max_image_size, crops or {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Decoded:
        name, path = self.items[index]
        try:
            image = load_image(path, crop=self.crops.get(name))
        except BadImage as e:
            return name, path, None, None, str(e)
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        if self.max_image_size is not None:
            tensor = shrink(tensor, self.max_image_size).contiguous()
        return name, path, tensor, image.size, None


def image_loader(items: list[tuple[str, Path]], workers: int = 1, max_image_size: int | None = None,
                 pin_memory: bool = False, crops: Mapping[str, Sequence[float]] | None = None
                 ) -> torch.utils.data.DataLoader:
    """Images in ``items`` order (see :class:`ImageDataset`), decoded (cropped to ``crops``, shrunk
    to ``max_image_size``) by ``workers`` background processes (0: in this one); ``pin_memory``
    for fast, asynchronous copies to a GPU."""
    return torch.utils.data.DataLoader(ImageDataset(items, max_image_size, crops), batch_size=None, shuffle=False,
                                       num_workers=workers, prefetch_factor=2 if workers else None,
                                       pin_memory=pin_memory)
