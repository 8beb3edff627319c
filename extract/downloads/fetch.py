"""Fetching the registry's items (extract/downloads/registry.py) with pooch: :func:`fetch_item`.

Each file is downloaded by pooch, which streams it to a temporary file in the target folder and
renames it into place only once it is complete and its hash (published, or recorded by the first
download) matches; a connection that fails or is cut is retried (``DownloadConfig.retries``), an
HTTP error or a wrong hash is not. An archive is then unpacked (extract/downloads/archives.py) and
deleted unless kept. After each file the item's manifest (extract/downloads/manifest.py) records
it, so a rerun checks what is in place (sizes; hashes with ``verify``) and downloads only what is
missing or damaged, archive by archive. Every failure is a one-line :class:`DownloadError` naming
the file and what to do.

    from extract.config import DownloadConfig
    from extract.downloads.fetch import fetch_item, item_folder
    from extract.downloads.registry import ITEMS
    fetch_item(ITEMS["roxford5k"], item_folder(ITEMS["roxford5k"], "R", "parameters"), DownloadConfig())
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pooch
import requests
from tqdm import tqdm

from extract.config import DownloadConfig
from extract.downloads.archives import BLOCK, disk_full, unpack
from extract.downloads.manifest import Manifest, Record, summary
from extract.downloads.registry import BASE_URL_ENV, ITEMS, Item, Remote
from extract.errors import DownloadError
from train.outputs import OutputLock, file_sha256

log = logging.getLogger("delf")
pooch.get_logger().setLevel(logging.WARNING)  # this module says what it downloads

TIMEOUT = 60  # seconds without a byte before a connection counts as failed


@dataclass
class Fetched:
    """What :func:`fetch_item` did: the files it downloaded, those already in place, and why
    recorded files were fetched again."""

    item: str
    folder: Path
    downloaded: list[str] = field(default_factory=list)
    in_place: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)


def item_folder(item: Item, data_root: str | Path, parameters_dir: str | Path) -> Path:
    """<data_root>/<name> for a dataset, <parameters_dir>/<name> for a release."""
    return Path(data_root if item.kind == "dataset" else parameters_dir) / item.name


def file_url(item: Item, remote: Remote, base_url: str | None = None) -> str:
    """Where ``remote`` is fetched from: <base_url>/<item>/<file> when a base URL is given
    (``base_url``, else $DELF_DOWNLOAD_URL), else its authors' URL."""
    base = base_url or os.environ.get(BASE_URL_ENV)
    return f"{base.rstrip('/')}/{item.name}/{remote.name}" if base else remote.url


def download(url: str, path: Path, sha256: str | None, conf: DownloadConfig,
             hash_source: str = "the published one") -> bool:
    """``url`` to ``path`` unless ``path`` is already there (with ``sha256``, when given); True
    when it downloaded. A wrong hash, an HTTP error, a connection failing more than
    ``conf.retries`` times or a full disk: DownloadError, and ``path`` is left as it was."""
    if path.is_file() and (sha256 is None or file_sha256(path) == sha256):
        return False
    fetcher = pooch.create(path=path.parent, base_url="", registry={path.name: sha256 and f"sha256:{sha256}"},
                           urls={path.name: url})
    for attempt in range(conf.retries + 1):
        # pooch sets the total from Content-Length
        bar = tqdm(desc=path.name, total=1, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                   disable=not conf.progress)
        downloader = pooch.HTTPDownloader(progressbar=bar if conf.progress else False, chunk_size=BLOCK,
                                          timeout=TIMEOUT)
        try:
            fetcher.fetch(path.name, downloader=downloader)
            return True
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else "error"
            reason = e.response.reason if e.response is not None else str(e)
            raise DownloadError(f"{url}: HTTP {status} {reason}; {path} not written: check the address, use a mirror "
                                f"(--base_url or ${BASE_URL_ENV}), or download it by hand") from None
        except requests.RequestException as e:
            if attempt == conf.retries:
                raise DownloadError(f"{url}: download cut off or failed {attempt + 1} times (last: {type(e).__name__}: "
                                    f"{_reason(e)}); {path} not written, rerun to try again") from None
            log.warning("%s: %s, trying again (%d of %d)", url, type(e).__name__, attempt + 1, conf.retries)
            time.sleep(min(2 ** attempt, 30))
        except ValueError as e:
            if "hash" not in str(e):
                raise
            raise DownloadError(f"{url}: the download's sha256 differs from {hash_source} ({sha256}): the file was "
                                f"damaged on the way or changed on the server; {path} not written, rerun to try "
                                "again") from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(path, f"downloading {url}") from None
            raise DownloadError(f"{path}: cannot write it ({e.strerror or e})") from None
        finally:
            bar.close()
    raise AssertionError("unreachable")


def _reason(error: BaseException) -> str:
    """The innermost message of a requests / urllib3 error, on one line."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = (error.args[0] if error.args and isinstance(error.args[0], str) else str(error)).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def fetch_item(item: Item, folder: Path, conf: DownloadConfig | None = None) -> Fetched:
    """Every file of ``item`` into ``folder`` (see the module docstring); one process at a time."""
    conf = conf or DownloadConfig()
    folder.mkdir(parents=True, exist_ok=True)
    done = Fetched(item.name, folder)
    with OutputLock(folder, hint="wait for it to finish"):
        manifest = Manifest.load(folder, item.name)
        for number, remote in enumerate(item.files, 1):
            path = folder / remote.name
            record = manifest.records.get(remote.name)
            if record is not None:
                problems = manifest.problems(remote.name, conf.verify)
                if not problems:
                    if remote.unpack is not None and not record.kept and path.is_file():
                        path.unlink()  # unpacked and recorded by a run stopped before it deleted the archive
                    done.in_place.append(remote.name)
                    continue
                log.warning("%s: %s recorded in %s, but %s: fetching it again", item.name, remote.name,
                            manifest.path, summary(problems))
                done.repaired.append(remote.name)
            known, source = remote.sha256, "the published one"
            if known is None and record is not None:
                known, source = record.sha256, f"the one recorded in {manifest.path}"
            url = file_url(item, remote, conf.base_url)
            log.info("%s: [%d/%d] %s (%s)", item.name, number, len(item.files), remote.name, url)
            if download(url, path, known, conf, source):
                done.downloaded.append(remote.name)
            size, sha256 = path.stat().st_size, known or file_sha256(path)
            if remote.unpack is None:
                manifest.records[remote.name] = Record(url, size, sha256)
            else:
                members = unpack(path, folder, remote.unpack, conf.progress)
                manifest.records[remote.name] = Record(url, size, sha256, members, conf.keep_archives)
            manifest.save()
            if remote.unpack is not None and not conf.keep_archives:
                path.unlink()
    return done


def fetch_items(names: list[str], data_root: str | Path, parameters_dir: str | Path,
                conf: DownloadConfig | None = None) -> list[Fetched]:
    """:func:`fetch_item` of each named item of the registry, in order."""
    return [fetch_item(ITEMS[n], item_folder(ITEMS[n], data_root, parameters_dir), conf) for n in names]
