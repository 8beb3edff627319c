"""Download the evaluation datasets and the official DELF releases, by name.

    python extract/download.py roxford5k rparis6k --data_root R        # R/<dataset>/{jpg/, gnd_<dataset>.pkl}
    python extract/download.py revisitop1m --data_root R               # R/revisitop1m/jpg/ (about 400 GB)
    python extract/download.py delf_v1_20171026 delf_gld_20190411      # repo/parameters/<release>/
    python extract/download.py --list                                  # every name, file and URL

Defaults: datasets under repo/data/, releases under repo/parameters/ ($DELF_REPO_DIR moves both).
Each folder's manifest.json records every file's size and sha256; a rerun checks the sizes
(--verify: the hashes too) and downloads only what is missing, archive by archive. --base_url (or
$DELF_DOWNLOAD_URL) fetches from a mirror holding <base_url>/<name>/<file>. The work is done by
extract/downloads/ (the URLs: extract/downloads/registry.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
from typing import Sequence

from extract.config import DownloadConfig, data_root, parameters_dir
from extract.downloads.fetch import fetch_items, file_url
from extract.downloads.registry import ITEMS
from extract.errors import UserError
from train.cli import ScriptParser, add_config_args, config_from_args
from train.outputs import OutputInUse


def item_name(text: str) -> str:
    """argparse type: a name of the registry."""
    if text not in ITEMS:
        raise argparse.ArgumentTypeError(f"unknown name {text!r} (choose from {', '.join(ITEMS)})")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", type=item_name, metavar="NAME", help=f"what to download: {', '.join(ITEMS)}")
    p.add_argument("--data_root", type=Path, help="folder of the datasets (default repo/data)")
    p.add_argument("--parameters_dir", type=Path, help="folder of the releases (default repo/parameters)")
    p.add_argument("--list", action="store_true", help="print every name, its files and their URLs, and stop")
    add_config_args(p, DownloadConfig)
    return p


def listing(conf: DownloadConfig) -> str:
    """Every name of the registry, what it is, and each file's URL (as fetched with ``conf``)."""
    lines = []
    for item in ITEMS.values():
        lines.append(f"{item.name} ({item.kind}): {item.about}")
        lines += [f"  {file_url(item, remote, conf.base_url)}" for remote in item.files]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Download; returns the exit status (1 with a one-line error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    conf = config_from_args(DownloadConfig, args)
    if args.list:
        print(listing(conf))
        return 0
    if not args.names:
        parser.error("name what to download (or --list)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        done = fetch_items(args.names, args.data_root or data_root(), args.parameters_dir or parameters_dir(), conf)
    except (UserError, OutputInUse) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for fetched in done:
        again = f", {len(fetched.repaired)} fetched again (missing or damaged files)" if fetched.repaired else ""
        print(f"{fetched.item}: complete in {fetched.folder} ({len(fetched.downloaded)} downloaded, "
              f"{len(fetched.in_place)} already in place{again}; manifest.json records them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
