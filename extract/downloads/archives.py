"""Unpacking a downloaded tar archive (.tar, .tgz, .tar.gz) into its item's folder.

Only regular files are unpacked (no links, devices or permissions), each at a path that stays
inside the target folder; each is written to a temporary name beside it and renamed into place
once complete, so a killed or failed unpacking leaves no partial file under a member's name. The
archive is read once, front to back, and every member's size and sha256 is computed as it is
written (the manifest records them).
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import os
import posixpath
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import IO

from tqdm import tqdm

from extract.downloads.registry import Unpack
from extract.errors import DownloadError

BLOCK = 1 << 20
RESERVED = "manifest.json"  # extract/downloads/manifest.py's file, which no member may replace


def member_path(name: str, spec: Unpack) -> str | None:
    """Where archive member ``name`` goes, relative to ``spec.into`` ('/'-separated), by
    :class:`Unpack`'s rules; None for a member that would land outside it."""
    path = posixpath.normpath(name.replace("\\", "/")).lstrip("/")
    if path in ("", ".") or path == ".." or path.startswith("../") or posixpath.isabs(name):
        return None
    if spec.flatten:
        return posixpath.basename(path)
    if spec.strip and path.startswith(spec.strip + "/"):
        path = path[len(spec.strip) + 1:]
    return path


def disk_full(path: Path, doing: str) -> DownloadError:
    """The one-line error of a full disk while ``doing`` into ``path``'s folder."""
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    return DownloadError(f"{path}: disk full while {doing} ({free / 2**30:.1f} GiB free there); free some space "
                         "or choose another folder, then rerun: what is complete is kept and recorded")


def _write(source: IO[bytes], dest: Path) -> tuple[int, str]:
    """Copy ``source`` to ``dest`` through a temporary file renamed into place; (size, sha256)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for block in iter(lambda: source.read(BLOCK), b""):
                digest.update(block)
                out.write(block)
                size += len(block)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def unpack(archive: Path, folder: Path, spec: Unpack, progress: bool = True) -> dict[str, list]:
    """The regular files of ``archive`` into ``folder / spec.into``; returns each one's path under
    ``folder`` -> [size, sha256]. DownloadError (naming the archive) for a damaged archive, two
    members of one name after flattening (or one named as the manifest), or a full disk."""
    into = folder / spec.into
    members: dict[str, list] = {}
    bar = tqdm(desc=f"unpacking {archive.name}", unit=" files", disable=not progress, dynamic_ncols=True)
    dest = into
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                rel = member_path(member.name, spec) if member.isfile() else None
                if rel is None:
                    continue
                dest = into / rel
                key = dest.relative_to(folder).as_posix()
                if key in members or key == RESERVED:
                    what = "the manifest" if key == RESERVED else f"{dest} twice"
                    raise DownloadError(f"{archive}: member {member.name} would overwrite {what}; delete the archive")
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                members[key] = list(_write(source, dest))
                bar.update()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DownloadError(f"{archive}: damaged archive ({type(e).__name__}: {e}); delete it and rerun to "
                            "download it again") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(dest, f"unpacking {archive.name}") from None
        raise
    finally:
        bar.close()
    if not members:
        raise DownloadError(f"{archive}: no files in the archive; delete it and rerun to download it again")
    return members
