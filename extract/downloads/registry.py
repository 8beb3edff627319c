"""What extract/download.py fetches, by name: every URL (and every published hash) in one place.

    roxford5k, rparis6k    Revisited Oxford / Paris: the images, as revisitop's download.py fetches them
                           (the Oxford Buildings / Paris archives; Paris's nested folders flattened into
                           jpg/), and revisitop's ground truth gnd_<dataset>.pkl
    revisitop1m            the 1M distractors: 100 archives unpacked into jpg/ (their own sub-folders kept,
                           as revisitop1m.txt lists them), and revisitop1m.txt
    delf_v1_20171026,      the official DELF releases (tensorflow/models research/delf): model/ and pca/
    delf_gld_20190411

Datasets go to <data_root>/<name>/ (the layout extract/evaluation/revisitop.py reads), releases to
<parameters_dir>/<name>/ (the folder extract/convert_official.py --source takes). A mirror holds every
file as <base_url>/<name>/<file name> (--base_url, or $DELF_DOWNLOAD_URL). The authors publish no
checksums for these files: the first download records each file's size and sha256 in the manifest
(extract/downloads/manifest.py), and later downloads must match it; a hash given here (``sha256``) is
checked on every download.
"""
from __future__ import annotations

from dataclasses import dataclass

BASE_URL_ENV = "DELF_DOWNLOAD_URL"

REVISITOP = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
PARIS = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
REVISITOP1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
DELF = "http://storage.googleapis.com/delf"


@dataclass(frozen=True)
class Unpack:
    """Where an archive's regular files go, under its item's folder: ``into`` (a sub-folder), by
    base name alone when ``flatten`` (Paris's paris/<landmark>/ folders), else at their path in the
    archive less a leading ``strip`` folder where they have one (a release's own folder)."""

    into: str = "."
    flatten: bool = False
    strip: str = ""


@dataclass(frozen=True)
class Remote:
    """One file to download: its name on disk, its URL, its sha256 where one is published, and how
    to unpack it (None: it stays as downloaded, in its item's folder)."""

    name: str
    url: str
    sha256: str | None = None
    unpack: Unpack | None = None


@dataclass(frozen=True)
class Item:
    """A name download.py accepts: a dataset (under --data_root) or a release (under --parameters_dir)."""

    name: str
    kind: str  # "dataset" or "release"
    about: str
    files: tuple[Remote, ...]


def _dataset(name: str, base: str, archives: tuple[str, ...], about: str) -> Item:
    images = tuple(Remote(a, f"{base}/{a}", unpack=Unpack("jpg", flatten=True)) for a in archives)
    return Item(name, "dataset", about, (Remote(f"gnd_{name}.pkl", f"{REVISITOP}/{name}/gnd_{name}.pkl"), *images))


def _release(name: str, about: str) -> Item:
    return Item(name, "release", about, (Remote(f"{name}.tar.gz", f"{DELF}/{name}.tar.gz", unpack=Unpack(strip=name)),))


ITEMS: dict[str, Item] = {item.name: item for item in (
    _dataset("roxford5k", OXFORD, ("oxbuild_images-v1.tgz",), "Revisited Oxford: 4 993 images, 70 queries"),
    _dataset("rparis6k", PARIS, ("paris_1-v1.tgz", "paris_2-v1.tgz"), "Revisited Paris: 6 322 images, 70 queries"),
    Item("revisitop1m", "dataset", "revisitop's 1M distractor images (100 archives, about 400 GB)",
         (Remote("revisitop1m.txt", f"{REVISITOP1M}/revisitop1m.txt"),
          *(Remote(f"revisitop1m.{i}.tar.gz", f"{REVISITOP1M}/jpg/revisitop1m.{i}.tar.gz", unpack=Unpack("jpg"))
            for i in range(1, 101)))),
    _release("delf_v1_20171026", "the official DELF model of the ICCV 2017 paper (Landmarks-clean)"),
    _release("delf_gld_20190411", "the official DELF model trained on Google Landmarks v1 (Detect-to-Retrieve)"),
)}
