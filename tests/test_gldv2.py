"""Google Landmarks v2 as training data: both CSV formats, the split, skipped rows, datasets."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from train.dataloader import DataError, train_transform
from train.gldv2 import Gldv2Images, image_path, read_gldv2


def test_image_path_layout() -> None:
    assert image_path("/r", "abcdef0123456789") == Path("/r/a/b/c/abcdef0123456789.jpg")


@pytest.mark.parametrize("csv_name", ["train.csv", "train_clean.csv"])
def test_both_formats_give_the_same_index(gld: Path, csv_name: str) -> None:
    index = read_gldv2(gld / csv_name, gld / "train", val_fraction=0.2)
    assert index.classes == ("10", "20", "30")
    # 5 images per landmark: floor(5 * 0.2) = 1 to val, 4 to train
    assert len(index.train) == 12 and len(index.val) == 3
    assert sorted(label for _, label in index.val) == [0, 1, 2]
    assert all(Path(p).is_file() for p, _ in index.train + index.val)
    assert not {p for p, _ in index.train} & {p for p, _ in index.val}
    assert index.skipped == {"malformed": 0, "missing image": 0, "small class": 0}


def test_split_is_deterministic_and_independent_of_row_order(gld: Path, tmp_path: Path) -> None:
    lines = (gld / "train.csv").read_text().splitlines()
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    a = read_gldv2(gld / "train.csv", gld / "train")
    b = read_gldv2(shuffled, gld / "train")
    assert (a.train, a.val) == (b.train, b.val)


def test_bad_rows_are_skipped_named_and_counted(gld: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = (gld / "train.csv").read_text().splitlines()
    bad = [lines[0], *lines[1:],
           "0123456789abcdef,http://x,10",  # image not on disk
           "zzz,http://x,10",               # not a GLDv2 id
           "0123456789abcdef,http://x",     # a field short
           "0123456789abcdef,http://x,ten",  # landmark is not a number
           f"{lines[1].split(',')[0]},http://x,99"]  # the only image of landmark 99: a small class
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("\n".join(bad) + "\n")
    with caplog.at_level(logging.WARNING, logger="delf"):
        index = read_gldv2(csv_path, gld / "train", min_images_per_class=2)
    assert index.skipped == {"malformed": 3, "missing image": 1, "small class": 1}
    assert index.classes == ("10", "20", "30")
    text = caplog.text
    assert f"{csv_path}:17: skipped (missing image:" in text and "0123456789abcdef.jpg does not exist" in text
    assert f"{csv_path}:18: skipped (malformed: image id 'zzz'" in text
    assert f"{csv_path}:19: skipped (malformed: 2 fields, expected 3)" in text
    assert "skipped: 3 malformed, 1 missing image, 1 small class" in index.summary()


def test_min_images_per_class(gld: Path) -> None:
    assert read_gldv2(gld / "train.csv", gld / "train", min_images_per_class=5).classes == ("10", "20", "30")
    with pytest.raises(DataError, match=r"train.csv: no landmark has 6 or more usable images"):
        read_gldv2(gld / "train.csv", gld / "train", min_images_per_class=6)


@pytest.mark.parametrize("content, message", [
    ("image,landmark\n", "is neither 'id,url,landmark_id'"),
    (None, "no such CSV file"),
])
def test_bad_csv_files(tmp_path: Path, gld: Path, content: str | None, message: str) -> None:
    path = tmp_path / "x.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        read_gldv2(path, gld / "train")
    assert str(path) in str(e.value)


def test_dataset_yields_images_and_labels(gld: Path) -> None:
    index = read_gldv2(gld / "train_clean.csv", gld / "train", val_fraction=0.2)
    train = Gldv2Images(index, "train", train_transform(48, 40))
    assert train.classes == ["10", "20", "30"] and len(train) == 12
    image, label = train[5]
    assert image.shape == (3, 40, 40) and image.dtype == torch.float32 and label == train.samples[5][1]
    assert len(Gldv2Images(index, "val", train_transform(48, 40))) == 3
    empty = read_gldv2(gld / "train_clean.csv", gld / "train", val_fraction=0.0)
    with pytest.raises(DataError, match="the val split is empty"):
        Gldv2Images(empty, "val", train_transform(48, 40))
