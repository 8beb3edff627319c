"""Figures of a Revisited Oxford / Paris evaluation (``evaluate.py --figures DIR``).

Per query, ``<DIR>/<query index>_<query name>.png``: the query's crop (its bbx), then one row per
ranking (e.g. the initial one and the one after spatial verification) of its top images, each
framed by its relevance under the Medium protocol: green positive (easy or hard), red negative,
grey junk. Over the whole set, ``<DIR>/ap_medium.png``: each query's Medium AP, one bar per ranking.

Figures are matplotlib :class:`~matplotlib.figure.Figure` objects made without pyplot, so they
need no display and no backend choice, and are freed like any object.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from extract.evaluation.metrics import compute_map, protocol_gnd
from extract.evaluation.revisitop import Dataset, EvalError
from extract.extraction.images import BadImage, load_image

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FRAME_COLOURS = {"positive": "#00a000", "negative": "#e00000", "junk": "#999999"}
TOP = 10           # images shown per ranking
THUMB_PX = 240     # longest side of the images as loaded for a figure
FRAME_PT = 4.0     # frame line width, points
DPI = 100
AP_CHART = "ap_medium.png"


@dataclass
class RankingRow:
    """The top of one ranking for one query: ``title`` (e.g. "ASMK*+SP: AP 61.3"), then per
    image, best first, its picture, name and kind (a key of :data:`FRAME_COLOURS`)."""

    title: str
    images: Sequence[Image.Image]
    names: Sequence[str]
    kinds: Sequence[str]


def relevance(gnd: Mapping[str, np.ndarray], index: int) -> str:
    """"positive", "junk" or "negative": database image ``index`` under one query's protocol
    ground truth (``ok``, ``junk``: :func:`extract.evaluation.metrics.protocol_gnd`)."""
    if index in gnd["ok"]:
        return "positive"
    return "junk" if index in gnd["junk"] else "negative"


def thumbnail(path: Path, crop: Sequence[float] | None = None) -> Image.Image:
    """The image at ``path`` (cropped to ``crop`` [x1, y1, x2, y2] in stored pixels, as the query
    features are), upright, its longest side at most :data:`THUMB_PX`; EvalError when unusable."""
    try:
        img = load_image(path, crop)
    except BadImage as e:
        raise EvalError(f"{path}: {e}") from None
    img.thumbnail((THUMB_PX, THUMB_PX))
    return img


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _show(ax: Axes, img: Image.Image) -> None:
    ax.imshow(np.asarray(img))
    ax.set_xticks([])
    ax.set_yticks([])


def query_figure(query: Image.Image, query_name: str, rows: Sequence[RankingRow]) -> Figure:
    """The query (left, spanning the rows) and one row of framed images per ranking. The image
    axes are labelled "<row>,<rank>" (0-based), the query's "query"."""
    from matplotlib.figure import Figure

    cols = 1 + max([1, *(len(row.images) for row in rows)])
    fig = Figure(figsize=(1.6 * cols, 2.0 * len(rows) + 0.2), dpi=DPI)
    grid = fig.add_gridspec(len(rows), cols, left=0.01, right=0.99, bottom=0.06, top=0.88, wspace=0.08,
                            hspace=0.5)
    ax = fig.add_subplot(grid[:, 0], label="query")
    _show(ax, query)
    ax.set_title(f"query\n{_short(query_name)}", fontsize=8)
    for k, row in enumerate(rows):
        for r, (img, name, kind) in enumerate(zip(row.images, row.names, row.kinds, strict=True)):
            ax = fig.add_subplot(grid[k, 1 + r], label=f"{k},{r}")
            _show(ax, img)
            for spine in ax.spines.values():
                spine.set_edgecolor(FRAME_COLOURS[kind])
                spine.set_linewidth(FRAME_PT)
            ax.set_xlabel(f"{r + 1}. {_short(name)}", fontsize=6)
            if r == 0:
                ax.set_title(row.title, loc="left", fontsize=8)
    return fig


def ap_chart(names: Sequence[str], aps: Mapping[str, np.ndarray], title: str) -> Figure:
    """Bars of each query's AP (percent; NaN, a query without positives: a bar of height 0), one
    bar per ranking, side by side; the legend gives each ranking's mAP (NaN left out)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.25 * len(names) * max(1, len(aps)) + 1.5), 4.0), dpi=DPI)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(aps))
    x = np.arange(len(names))
    for k, (label, values) in enumerate(aps.items()):
        values = np.asarray(values, dtype=np.float64)
        mean = np.nanmean(values) if not np.isnan(values).all() else math.nan
        ax.bar(x + (k - (len(aps) - 1) / 2) * width, np.nan_to_num(values, nan=0.0), width,
               label=f"{label} (mAP {mean:.2f})")
    ax.set_xticks(x, [_short(n) for n in names], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(0, 120)  # the legend above the 100 line
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", ncol=len(aps), frameon=False)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    """``fig`` as a PNG at :data:`DPI`; EvalError naming ``path`` when it cannot be written."""
    try:
        fig.savefig(path, dpi=DPI, format="png")
    except OSError as e:
        raise EvalError(f"{path}: cannot write the figure ({e.strerror or e})") from None
    return path


def figure_name(index: int, query_name: str) -> str:
    """The file name of query ``index``'s figure: ``<index, 3 digits>_<name, file-name safe>.png``."""
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9._-]', '-', query_name)}.png"


def ranking_figure(ds: Dataset, index: int, rankings: Mapping[str, np.ndarray],
                   database_image: Callable[[int], Path], top: int = TOP) -> Figure:
    """:func:`query_figure` of query ``index`` of ``ds``: each ranking's (database size, queries)
    top ``top``, framed by Medium relevance, titled with the query's Medium AP.
    ``database_image(i)`` is the file of database image i."""
    medium = protocol_gnd([ds.gnd[index]], "medium")[0]
    rows = []
    for label, ranks in rankings.items():
        ap = compute_map(ranks[:, index:index + 1], [medium])[0]
        shown = [int(i) for i in ranks[:top, index]]
        rows.append(RankingRow(f"{label}: AP {100 * ap:.1f}" if not math.isnan(ap) else f"{label}: no positive",
                               [thumbnail(database_image(i)) for i in shown],
                               [ds.imlist[i] if i < len(ds.imlist) else database_image(i).name for i in shown],
                               [relevance(medium, i) for i in shown]))
    query = ds.qimlist[index]
    return query_figure(thumbnail(ds.path(query), np.asarray(ds.gnd[index]["bbx"]).ravel().tolist()), query, rows)


def ap_figure(ds: Dataset, rankings: Mapping[str, np.ndarray]) -> Figure:
    """:func:`ap_chart` of every query's Medium AP under each ranking ((database size, queries))."""
    medium = protocol_gnd(ds.gnd, "medium")
    aps = {label: 100.0 * compute_map(ranks, medium)[1] for label, ranks in rankings.items()}
    return ap_chart(ds.qimlist, aps, f"{ds.name}, Medium protocol: AP per query")


def make_folder(out_dir: str | Path) -> Path:
    """``out_dir``, made if missing; EvalError naming it when it cannot be."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"{out_dir}: cannot make the figures folder ({e.strerror or e})") from None
    return out_dir


def write_figures(ds: Dataset, rankings: Mapping[str, np.ndarray], out_dir: str | Path,
                  database_image: Callable[[int], Path]) -> list[Path]:
    """Every query's :func:`ranking_figure` and the rankings' :func:`ap_figure` (labelled by
    their keys, e.g. {"ASMK*": initial, "ASMK*+SP": final}), as PNGs in ``out_dir``; returns the
    files written."""
    out_dir = make_folder(out_dir)
    written = []
    for index, query in enumerate(ds.qimlist):
        written.append(save(ranking_figure(ds, index, rankings, database_image),
                            out_dir / figure_name(index, query)))
    written.append(save(ap_figure(ds, rankings), out_dir / AP_CHART))
    return written
