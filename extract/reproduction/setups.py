"""The published results extract/reproduce.py reproduces, by name, each with the configs/ file of
its evaluation, the data and model it needs, and the published figures.

    delf_v1_roxf_asmk_sp, delf_v1_rpar_asmk_sp     DELF-ASMK*+SP, 128-D (Radenović et al., CVPR 2018)
                                                   with the official delf_v1_20171026
    delf_gld_roxf_asmk_sp, delf_gld_rpar_asmk_sp   R-ASMK*+SP (Teichmann et al., CVPR 2019) with the
                                                   official delf_gld_20190411; plain ASMK*+SP here

A setup's config file holds extract/evaluate.py's flags (dataset, model, method, codebook size,
re-ranking, descriptor dimension); the codebook is trained on the other dataset's images, as
published. The figures are mAP in percent, Medium and Hard (revisitop protocol).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

PROJECT_ROOT = Path(__file__).resolve().parents[2]   # train.runtime's, without importing torch
CONFIGS = PROJECT_ROOT / "configs"


@dataclass(frozen=True)
class Published:
    """A published result: who published it, the method as they name it, and its mAP per protocol
    (percent)."""

    source: str
    method: str
    mAP: Mapping[str, float]  # noqa: N815 (the metric's name)


@dataclass(frozen=True)
class Setup:
    """One published row: ``config`` (extract/evaluate.py's flags; its ``load_expr`` is the model),
    the dataset whose images train the ASMK* codebook, the official release converted into
    repo/<load_expr> when that model is missing (None: the experiment must exist), the published
    figures, and what differs from the published method (``note``)."""

    name: str
    config: Path
    codebook: str | None
    release: str | None
    published: Published
    note: str = ""


def _radenovic(medium: float, hard: float) -> Published:
    return Published("Radenović et al., CVPR 2018", "DELF-ASMK*+SP, 128-D, 65 536 words",
                     {"medium": medium, "hard": hard})


def _teichmann(medium: float, hard: float) -> Published:
    return Published("Teichmann et al., CVPR 2019", "R-ASMK*+SP, 128-D", {"medium": medium, "hard": hard})


NO_REGIONS = ("Detect-to-Retrieve aggregates over detected regions (R-ASMK*), which this repository does not "
              "implement: plain ASMK*+SP is expected below the published figures")

SETUPS: dict[str, Setup] = {s.name: s for s in (
    Setup("delf_v1_roxf_asmk_sp", CONFIGS / "roxf_delf_asmk_sp.toml", "rparis6k", "delf_v1_20171026",
          _radenovic(67.8, 43.1)),
    Setup("delf_v1_rpar_asmk_sp", CONFIGS / "rpar_delf_asmk_sp.toml", "roxford5k", "delf_v1_20171026",
          _radenovic(76.9, 55.4)),
    Setup("delf_gld_roxf_asmk_sp", CONFIGS / "roxf_delf_gld_asmk_sp.toml", "rparis6k", "delf_gld_20190411",
          _teichmann(76.0, 52.4), NO_REGIONS),
    Setup("delf_gld_rpar_asmk_sp", CONFIGS / "rpar_delf_gld_asmk_sp.toml", "roxford5k", "delf_gld_20190411",
          _teichmann(80.2, 58.6), NO_REGIONS),
)}


def shown(path: str | Path) -> str:
    """``path`` relative to the project when inside it, as the docs write paths."""
    path = Path(path)
    try:
        return path.resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)
