"""DeLF extraction from the command line: fit the PCA (--mode pca), then extract features (--mode delf).

    cd extract && python extractor.py --load_expr delf --mode pca --input_path <train images>
    cd extract && python extractor.py --load_expr delf --mode delf --input_path <images>
    torchrun --nproc_per_node=N extract/extractor.py --mode delf ...   # images split over processes
    python extract/extractor.py --config configs/extract_delf_gld.toml --input_path <images>

The seed README's flags work as written. Defaults (extract/config.py): the model is repo/<load_expr>/
keypoint/ckpt/fix.pth.tar, the PCA file repo/<load_expr>/pca/pca.h5, the features repo/<load_expr>/
features/<input folder name>.h5. Unusable images are skipped and listed in <output>.report.txt.
The work itself is done by extract/extraction/extract_features.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
from typing import TYPE_CHECKING

from extract.config import PcaFitConfig, features_path, pca_path
from extract.flags import add_extraction_args, model_files
from train.cli import (
    ScriptParser,
    add_bool_flag,
    add_config_args,
    add_config_file_arg,
    config_from_args,
    parse_args_given,
)

if TYPE_CHECKING:
    import torch

    from extract.extraction.report import Report
    from extract.extraction.workshare import WorkShare

log = logging.getLogger("delf")


def expected_errors() -> tuple[type[Exception], ...]:
    """The errors :func:`main` prints in one line (imported once the flags are parsed: torch)."""
    from extract.errors import UserError
    from extract.extraction.feature_file import FeatureFileError
    from extract.extraction.images import InputError
    from extract.extraction.pca import PcaError
    from train.checkpoint import CheckpointError
    from train.outputs import OutputInUse, OutputWriteError

    return CheckpointError, PcaError, FeatureFileError, InputError, UserError, OutputInUse, OutputWriteError


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_file_arg(p)
    p.add_argument("--mode", choices=("pca", "delf"), default="delf", help="fit the PCA, or extract features")
    p.add_argument("--input_path", required=True, help="image folder (recursive) or a text file of image paths")
    p.add_argument("--output_path", help="pca: the PCA file (default: --pca_parameters_path); delf: the feature file")
    p.add_argument("--stage", choices=("inference",), default="inference", help="model stage (seed flag)")
    p.add_argument("--gpu_id", help="sets CUDA_VISIBLE_DEVICES (seed flag)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="seed flag; images differ in size, so they are processed one at a time")
    p.add_argument("--workers", type=int, help="image-decoding (and shrinking) processes; 0: in this one "
                   "(default: 1 on CPU; on CUDA the CPUs per process less one, at most 8)")
    add_extraction_args(p)
    add_config_args(p, PcaFitConfig)
    add_bool_flag(p, "--save_attention", default=False, help="delf: also store the attention map at scale 1.0")
    add_bool_flag(p, "--deterministic", default=False,
                  help="deterministic algorithms, no cuDNN autotuning, TF32 off (GPU features then agree with the "
                  "CPU's to rounding; the feature file records tf32 false)")
    add_bool_flag(p, "--overwrite", default=False, help="replace an existing output instead of resuming / refusing")
    return p


def run(args: argparse.Namespace, device: torch.device, share: WorkShare) -> Report:
    """The --mode run the flags describe; returns its report. A run that fails before writing
    anything leaves no new folder (nor lock file) behind."""
    from extract.extraction.extract_features import extract_features
    from extract.extraction.pca_fitting import fit_pca_file
    from train.outputs import removed_if_failed

    conf, checkpoint, pca_file = model_files(args)
    common = {"workers": args.workers, "overwrite": args.overwrite, "device": device, "share": share}
    if args.mode == "pca":
        output = Path(args.output_path) if args.output_path else pca_path(args.load_expr, args.pca_parameters_path)
        with removed_if_failed(output):
            return fit_pca_file(conf, checkpoint, args.input_path, output, config_from_args(PcaFitConfig, args),
                                **common)
    output = features_path(args.load_expr, args.input_path, args.output_path)
    with removed_if_failed(output):
        return extract_features(conf, checkpoint, args.input_path, output, pca_path=pca_file,
                                save_attention=args.save_attention, **common)


def main(argv: list[str] | None = None) -> int:
    """Run the extractor with command-line ``argv``; returns the exit status (0: at least one image
    extracted or already in the output; 1: none, or an error, reported without a traceback)."""
    try:
        args = parse_args_given(build_parser(), argv)
        # the flags first, then torch: --help and a bad flag need no torch
        from extract.extraction.workshare import WorkShare
        from train.runtime import deterministic_mode, setup_logging, setup_runtime, teardown_runtime

        runtime = setup_runtime(args.device, args.gpu_id, backend="gloo")  # its collectives are on the CPU
    except SystemExit as e:  # argparse errors and --help; a bad --device
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return int(e.code or 0)
    setup_logging(runtime.is_main)
    if args.batch_size != 1:
        log.warning("--batch_size %d: images differ in size and are processed one at a time", args.batch_size)
    try:
        with deterministic_mode(args.deterministic):
            report = run(args, runtime.device, WorkShare.join(runtime))
    except expected_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        teardown_runtime()
    if runtime.is_main:
        try:
            saved = f"report written to {report.save()}"
        except OSError as e:
            saved = f"report not written: {e}"
        print(report.text() + f"({saved})", end="\n")
    return 0 if report.processed + report.existing > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
