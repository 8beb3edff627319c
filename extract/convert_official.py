"""Convert an official DELF release (TensorFlow) into this project's model and PCA files.

    python extract/convert_official.py --source parameters/delf_gld_20190411 --expr delf_gld
    python extract/extractor.py --load_expr delf_gld --mode delf --input_path <images>

--source is the unpacked release (model/ and pca/). The model becomes repo/<expr>/keypoint/ckpt/
fix.pth.tar and the PCA repo/<expr>/pca/pca.h5; extraction with it then follows the official
extractor (its settings are recorded in the checkpoint; any flag given overrides them). Needs
TensorFlow, for this script only: pip install -r requirements-convert.txt. The work is done by
extract/official/convert.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.official.release import RELEASES, ConversionError, format_variables, list_variables
from train.cli import ScriptParser, add_bool_flag


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the unpacked release folder (holding model/ and pca/)")
    p.add_argument("--expr", help="experiment to write: repo/<expr>/keypoint/ckpt/fix.pth.tar and "
                                  "repo/<expr>/pca/pca.h5")
    p.add_argument("--release", choices=tuple(RELEASES),
                   help="which release --source is, for a folder not named after it (default: the folder's name; a "
                        "folder named after the other release is refused); it sets the PCA dimension: "
                        + ", ".join(f"{k} {v.pca_dims}-D" for k, v in RELEASES.items()))
    add_bool_flag(p, "--list", default=False, help="print the release's variables (name, shape) and stop")
    add_bool_flag(p, "--overwrite", default=False, help="replace an existing model of --expr")
    return p


def main(argv: list[str] | None = None) -> int:
    """Convert (or list) as the flags say; returns the exit status (1 with a one-line error; for a
    model it does not know, its variable listing first, on stdout)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.list and not args.expr:
        parser.error("--expr is required (or --list)")
    # the flags first, then torch: --help and a bad flag need no torch
    from extract.official.convert import UnknownModel, convert_release
    from train.checkpoint import CheckpointError

    try:
        if args.list:
            print(format_variables(list_variables(args.source)))
            return 0
        start = time.perf_counter()
        done = convert_release(args.source, args.expr, args.release, args.overwrite)
    except UnknownModel as e:
        print(format_variables(e.variables))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConversionError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(done.identity.lines()))
    if done.identity.warning:
        print(f"warning: {done.identity.warning}", file=sys.stderr)
    print(f"converted {args.source} in {time.perf_counter() - start:.1f} s:\n  model {done.checkpoint}\n"
          f"  PCA   {done.pca}\nignored (not part of the extraction model): {', '.join(done.unused) or 'nothing'}\n"
          f"extract with: python extract/extractor.py --load_expr {args.expr} --mode delf --input_path <images>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
