"""evaluate.py --figures: each query's crop and the top 10 of each ranking, framed by Medium-protocol
relevance (green positive, red negative, grey junk), and the chart of per-query AP; drawn headless
(matplotlib Figures without pyplot, Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.evaluate import main
from extract.evaluation.figures import AP_CHART, ap_figure, ranking_figure, save
from extract.evaluation.metrics import compute_map, protocol_gnd
from extract.evaluation.revisitop import Dataset, load_dataset
from extract.extraction.images import image_path, list_images
from tests.test_evaluate import write_gnd
from tests.utils import PHOTOS, photo

# query 0: positives 0, 3 (easy) and 5 (hard), junk 1; query 1: positive 2, junk 4; query 2: none
GND = [{"bbx": [20, 10, 140, 100], "easy": np.array([0, 3]), "hard": np.array([5]), "junk": np.array([1])},
       {"bbx": [0, 0, 120, 90], "easy": np.array([], np.int64), "hard": np.array([2]), "junk": np.array([4])},
       {"bbx": [0, 0, 60, 60], "easy": np.array([], np.int64), "hard": np.array([], np.int64),
        "junk": np.array([], np.int64)}]
# query 0's given ranking: junk, positive, negative, positive, negative, positive, then negatives
RANKS = np.stack([np.array([1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), np.arange(12)[::-1], np.arange(12)], axis=1)
EXPECTED_Q0 = ["junk", "positive", "negative", "positive", "negative", "positive"] + ["negative"] * 4


def make_dataset(root: Path) -> Dataset:
    """12 database photos (two sizes) and 3 queries, revisitop layout."""
    write_gnd(root, [f"db{i}" for i in range(12)], ["q0", "q1", "q2"], GND)
    jpg = root / "roxford5k" / "jpg"
    for i in range(12):
        Image.fromarray(photo(PHOTOS[i % len(PHOTOS)], 160 if i % 2 else 120)).save(jpg / f"db{i}.jpg")
    for i in range(3):
        Image.fromarray(photo(PHOTOS[i], 160)).save(jpg / f"q{i}.jpg")
    return load_dataset(root, "roxford5k")


def frame_kind(pixels: np.ndarray, ax: object) -> str:
    """The relevance a frame's colour says, sampled on the middle of its top and left sides."""
    box = ax.get_window_extent()  # display pixels, origin at the bottom left
    h = pixels.shape[0]
    top = pixels[h - round(box.y1), round((box.x0 + box.x1) / 2)].astype(int)
    left = pixels[h - round((box.y0 + box.y1) / 2), round(box.x0)].astype(int)
    assert np.abs(top - left).max() <= 2, (top, left)
    r, g, b = top
    if g > 120 and r < 60 and b < 60:
        return "positive"
    if r > 150 and g < 60 and b < 60:
        return "negative"
    if max(r, g, b) - min(r, g, b) <= 8 and 100 <= r <= 200:
        return "junk"
    return f"unexpected colour {(r, g, b)}"


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_figures_of_a_given_ranking(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = make_dataset(tmp_path / "data")
    np.save(tmp_path / "ranks.npy", RANKS)
    out = tmp_path / "figures"
    assert main(["--dataset", "roxford5k", "--data_root", str(tmp_path / "data"), "--ranks",
                 str(tmp_path / "ranks.npy"), "--figures", str(out)]) == 0
    assert f"wrote 4 figures to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["000_q0.png", "001_q1.png", "002_q2.png", AP_CHART]
    for path in out.iterdir():
        with Image.open(path) as img:
            assert img.format == "PNG" and 600 <= img.width <= 4000 and 150 <= img.height <= 1500, img.size

    # query 0: the file is the figure ranking_figure draws; its frames follow the ranking
    fig = ranking_figure(ds, 0, {"given ranking": RANKS}, lambda i: ds.path(ds.imlist[i]))
    pixels = rgb(save(fig, tmp_path / "again.png"))
    np.testing.assert_array_equal(pixels, rgb(out / "000_q0.png"))
    framed = {ax.get_label(): ax for ax in fig.axes if ax.get_label() != "query"}
    assert sorted(framed, key=lambda k: int(k.split(",")[1])) == [f"0,{r}" for r in range(10)]
    assert [frame_kind(pixels, framed[f"0,{r}"]) for r in range(10)] == EXPECTED_Q0
    ap = compute_map(RANKS[:, :1], protocol_gnd(ds.gnd[:1], "medium"))[0]
    assert framed["0,0"].get_title(loc="left") == f"given ranking: AP {100 * ap:.1f}"
    assert [framed[f"0,{r}"].get_xlabel() for r in (0, 9)] == ["1. db1", "10. db9"]
    # query 1 (ranked in reverse): db11 .. db2, with its positive 2 last and junk 4 eighth
    fig = ranking_figure(ds, 1, {"given ranking": RANKS}, lambda i: ds.path(ds.imlist[i]))
    pixels = rgb(save(fig, tmp_path / "again1.png"))
    kinds = [frame_kind(pixels, ax) for ax in fig.axes if ax.get_label() != "query"]
    assert kinds == ["negative"] * 7 + ["junk", "negative", "positive"]
    # a query without positives has no AP
    fig = ranking_figure(ds, 2, {"given ranking": RANKS}, lambda i: ds.path(ds.imlist[i]))
    assert [ax.get_title(loc="left") for ax in fig.axes if ax.get_label() == "0,0"] == ["given ranking: no positive"]

    # the chart: one bar per query at its Medium AP (none for query 2)
    aps = 100 * compute_map(RANKS, protocol_gnd(ds.gnd, "medium"))[1]
    chart = ap_figure(ds, {"given ranking": RANKS})
    np.testing.assert_array_equal(rgb(save(chart, tmp_path / "chart.png")), rgb(out / AP_CHART))
    bars = chart.axes[0].patches
    np.testing.assert_allclose([b.get_height() for b in bars], [aps[0], aps[1], 0.0])
    assert aps[0] > aps[1] > 0 and np.isnan(aps[2])
    legend = [t.get_text() for t in chart.axes[0].get_legend().get_texts()]
    assert legend == [f"given ranking (mAP {np.nanmean(aps):.2f})"]


def test_two_rankings_make_two_rows_and_two_bars_per_query(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "data")
    rankings = {"initial": RANKS, "re-ranked": RANKS[:, [2, 1, 0]]}
    fig = ranking_figure(ds, 0, rankings, lambda i: ds.path(ds.imlist[i]))
    labels = {ax.get_label() for ax in fig.axes}
    assert labels == {"query"} | {f"{k},{r}" for k in (0, 1) for r in range(10)}
    titles = {ax.get_label(): ax.get_title(loc="left") for ax in fig.axes}
    assert titles["0,0"].startswith("initial: AP ") and titles["1,0"].startswith("re-ranked: AP ")
    pixels = rgb(save(fig, tmp_path / "q0.png"))
    row1 = {ax.get_label(): frame_kind(pixels, ax) for ax in fig.axes if ax.get_label().startswith("1,")}
    # the second ranking of query 0 is 0, 1, 2, ...: positive, junk, negative, positive, ...
    assert [row1[f"1,{r}"] for r in range(6)] == ["positive", "junk", "negative", "positive", "negative", "positive"]
    assert len(ap_figure(ds, rankings).axes[0].patches) == 2 * 3


def test_missing_image_or_unwritable_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_dataset(tmp_path / "data")
    np.save(tmp_path / "ranks.npy", RANKS)
    args = ["--dataset", "roxford5k", "--data_root", str(tmp_path / "data"), "--ranks", str(tmp_path / "ranks.npy")]
    (tmp_path / "file").write_text("")
    assert main(args + ["--figures", str(tmp_path / "file" / "figures")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'file' / 'figures'}: cannot make the figures folder " \
                                      "(Not a directory)\n"
    (tmp_path / "data" / "roxford5k" / "jpg" / "db7.jpg").unlink()
    assert main(args + ["--figures", str(tmp_path / "figures")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 15 images missing under") and "db7.jpg" in err
    assert main(args) == 0  # scoring alone does not need the images


def test_image_path_finds_list_images_files(tmp_path: Path) -> None:
    (tmp_path / "set" / "a").mkdir(parents=True)
    for name in ("a/x.jpg", "y.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "set" / name)
    (tmp_path / "set" / "list.txt").write_text("a/x.jpg\ny.png\n")
    for source in (tmp_path / "set", tmp_path / "set" / "list.txt"):
        listed = list_images(source)
        assert [name for name, _ in listed] == ["a/x.jpg", "y.png"]
        assert all(image_path(source, name) == path for name, path in listed)
