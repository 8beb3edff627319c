"""The manifest beside downloaded data: ``<item folder>/manifest.json``, what each download gave.

    {"item": "rparis6k",
     "files": {"gnd_rparis6k.pkl": {"url": ..., "size": 1234, "sha256": "..."},
               "paris_1-v1.tgz":   {"url": ..., "size": ..., "sha256": "...", "kept": false,
                                    "members": {"jpg/paris_defense_000000.jpg": [size, "sha256"], ...}}}}

A file is recorded once it is complete: a plain file once downloaded, an archive once every
member is unpacked (``members``: their paths under the item's folder, i.e. which folder each came
from, with their size and sha256); ``kept`` says whether the archive itself was kept. The sizes and
hashes are those of the first download: a later download of the same file must match them. A
record is *complete* while every file it names is there at its size (and, when verifying, its
sha256): what a rerun checks instead of downloading. The file is replaced atomically.
"""
from __future__ import annotations

import errno
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from extract.downloads.archives import RESERVED, disk_full
from extract.errors import DownloadError
from train.outputs import atomic_path, file_sha256

MANIFEST_NAME = RESERVED


@dataclass
class Record:
    """One downloaded file: where it came from, its size and sha256; an archive's members (path
    under the item's folder -> [size, sha256]) and whether the archive was kept."""

    url: str
    size: int
    sha256: str
    members: dict[str, list[Any]] | None = None
    kept: bool = False


def file_problem(path: Path, size: int, sha256: str | None) -> str | None:
    """What is wrong with ``path`` against its record (None: nothing): missing, another size, or
    (when ``sha256`` is given) other bytes."""
    if not path.is_file():
        return f"{path}: missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path}: {actual} bytes, {size} recorded"
    if sha256 is not None and file_sha256(path) != sha256:
        return f"{path}: sha256 differs from the one recorded"
    return None


class Manifest:
    """The records of one item's folder (:data:`MANIFEST_NAME`); :meth:`save` after each change."""

    def __init__(self, folder: Path, item: str, records: dict[str, Record] | None = None) -> None:
        self.folder, self.item = folder, item
        self.records: dict[str, Record] = records or {}

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_NAME

    @classmethod
    def load(cls, folder: Path, item: str) -> Manifest:
        """The manifest in ``folder`` (empty when there is none)."""
        path = folder / MANIFEST_NAME
        if not path.exists():
            return cls(folder, item)
        try:
            data = json.loads(path.read_text())
            if data.get("item") != item:
                raise ValueError(f"it names {data.get('item')!r}")
            records = {name: Record(**fields) for name, fields in data["files"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise DownloadError(f"{path}: not a manifest of {item} ({type(e).__name__}: {e}); delete it (and "
                                "the files it listed) to download again") from None
        return cls(folder, item, records)

    def save(self) -> None:
        data = {"item": self.item, "files": {name: asdict(r) for name, r in self.records.items()}}
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(data, indent=1) + "\n")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(self.path, "recording what was downloaded") from None
            raise

    def problems(self, name: str, verify: bool = False) -> list[str]:
        """What is wrong with the files record ``name`` says are in place (empty: it is complete):
        every recorded file's size is checked, its sha256 too when ``verify``."""
        record = self.records[name]
        expected = {name: [record.size, record.sha256]} if record.members is None else record.members
        found = (file_problem(self.folder / rel, size, sha256 if verify else None)
                 for rel, (size, sha256) in expected.items())
        return [problem for problem in found if problem is not None]


def summary(problems: list[str], shown: int = 2) -> str:
    """The first ``shown`` problems, and how many more there are."""
    more = f" and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more
