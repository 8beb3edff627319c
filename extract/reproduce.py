"""Reproduce a published result in one command: download what is missing, convert the official
release, evaluate, and compare with the published figures.

    python extract/reproduce.py delf_v1_roxf_asmk_sp delf_v1_rpar_asmk_sp --data_root R
    python extract/reproduce.py --list                     # every setup and its published figures
    make reproduce SETUP=delf_v1_roxf_asmk_sp              # the same, requirements and TensorFlow installed

Prints the table (published mAP, this run's, the difference) and writes, per setup, table.md,
table.json and evaluation.json into repo/reproduce/<setup>/ (--output_dir). Every step resumes: a
second run downloads, converts and extracts nothing. Defaults: datasets under repo/data/, releases
under repo/parameters/. The setups: extract/reproduction/setups.py; the work:
extract/reproduction/pipeline.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
import shlex
from typing import Sequence

from extract.config import DownloadConfig, data_root, parameters_dir, reproduce_dir
from extract.reproduction.setups import SETUPS, shown
from train.cli import ScriptParser, add_config_args, config_from_args


def setup_name(text: str) -> str:
    """argparse type: a name of SETUPS."""
    if text not in SETUPS:
        raise argparse.ArgumentTypeError(f"unknown setup {text!r} (choose from {', '.join(SETUPS)})")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setups", nargs="*", type=setup_name, metavar="SETUP", help=f"one or more of: {', '.join(SETUPS)}")
    p.add_argument("--list", action="store_true", help="print every setup, its config and published figures, and stop")
    p.add_argument("--data_root", type=Path, help="folder of the datasets (default repo/data)")
    p.add_argument("--parameters_dir", type=Path, help="folder of the official releases (default repo/parameters)")
    p.add_argument("--output_dir", type=Path, help="the tables go to <output_dir>/<setup>/ (default repo/reproduce)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_config_args(p.add_argument_group("downloads (as extract/download.py)"), DownloadConfig)
    return p


def listing() -> str:
    """Every setup: its config, model and published figures."""
    lines = []
    for s in SETUPS.values():
        figures = " / ".join(f"{v:.1f}" for v in s.published.mAP.values())
        lines.append(f"{s.name}: {s.published.method} ({s.published.source}), mAP {'/'.join(s.published.mAP)} "
                     f"{figures}; {shown(s.config)}, model {s.release or 'of the config'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Reproduce the setups; returns the exit status (1 with a one-line error)."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(words)
    if args.list:
        print(listing())
        return 0
    if not args.setups:
        parser.error("name a setup (or --list)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # the flags first, then torch: --help and a bad flag need no torch
    from extract.errors import UserError
    from extract.evaluation.revisitop import EvalError
    from extract.extraction.feature_file import FeatureFileError
    from extract.extraction.images import InputError
    from extract.extraction.pca import PcaError
    from extract.reproduction.pipeline import reproduce
    from extract.reproduction.table import summary_table, write_reproduction
    from extract.retrieval.asmk.codebook import CodebookError
    from train.checkpoint import CheckpointError
    from train.outputs import OutputInUse, OutputWriteError

    expected = (UserError, EvalError, FeatureFileError, InputError, PcaError, CodebookError, CheckpointError,
                OutputInUse, OutputWriteError)
    conf = config_from_args(DownloadConfig, args)
    output = args.output_dir or reproduce_dir()
    done = []
    try:
        for name in args.setups:
            r = reproduce(SETUPS[name], args.data_root or data_root(), args.parameters_dir or parameters_dir(), conf,
                          args.device, shlex.join(["python", "extract/reproduce.py", *words]))
            written = write_reproduction(r, output / name)
            print(f"{name}: wrote {', '.join(str(p) for p in written)}")
            done.append(r)
    except expected as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary_table(done))
    for r in done:
        if r.setup.note:
            print(f"{r.setup.name}: {r.setup.note}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
