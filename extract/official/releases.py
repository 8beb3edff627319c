"""The official DELF releases this project knows (no heavy imports: convert_official.py's --help lists them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    """A known official release: its PCA dimension and what it is."""

    pca_dims: int
    about: str


RELEASES = {
    "delf_v1_20171026": Release(40, "DELF, ICCV 2017 (Google-Landmarks-clean)"),
    "delf_gld_20190411": Release(128, "DELF trained on Google Landmarks v1 (Detect-to-Retrieve, CVPR 2019)"),
}
