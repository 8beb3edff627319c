"""DeLF extraction from the command line: fit the PCA (--mode pca), then extract features (--mode delf).

    cd extract && python extractor.py --load_expr delf --mode pca --input_path <train images>
    cd extract && python extractor.py --load_expr delf --mode delf --input_path <images>
    torchrun --nproc_per_node=N extract/extractor.py --mode delf ...   # images split over processes

The seed README's flags work as written. Defaults: the model is repo/<load_expr>/keypoint/ckpt/
fix.pth.tar, the PCA file repo/<load_expr>/pca/pca.h5, the features repo/<load_expr>/features/
<input folder name>.h5. Unusable images are skipped and listed in <output>.report.txt.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from extract.features import FeatureFileError, FeatureWriter, iter_features  # noqa: E402
from extract.images import InputError, image_loader, list_images  # noqa: E402
from extract.pca import PcaError, Reservoir, fit_pca, merge_samples, save_pca  # noqa: E402
from extract.pipeline import DEFAULT_SCALES, DelfExtractor, too_small  # noqa: E402
from train.checkpoint import CheckpointError, file_sha256  # noqa: E402
from train.cli import str2bool  # noqa: E402
from train.runtime import (Runtime, repo_dir, setup_logging, setup_runtime,  # noqa: E402
                           teardown_runtime, warn_if_slow_amp)

log = logging.getLogger("delf")
EXPECTED_ERRORS = (CheckpointError, PcaError, FeatureFileError, InputError, ValueError)
# Stored in the feature file's attributes but free to change when a run is resumed.
INFORMATIONAL = ("checkpoint", "pca_parameters_path", "device", "workers", "batch_size")
T = TypeVar("T")


FLAG = {"type": str2bool, "nargs": "?", "const": True, "default": False}


def add_extraction_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The model and feature flags, shared with matcher.py and evaluate.py (same names, defaults)."""
    p.add_argument("--load_expr", default="delf", help="experiment under repo/ whose fix.pth.tar is used")
    p.add_argument("--load_from", help="checkpoint to use instead of repo/<load_expr>/keypoint/ckpt/fix.pth.tar")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--attn_thres", type=float, default=0.31, help="keep cells with attention >= this")
    p.add_argument("--iou_thres", type=float, default=0.92, help="NMS IoU threshold on receptive boxes")
    p.add_argument("--top_k", type=int, default=1000, help="features kept per image")
    p.add_argument("--scale_list", type=float, nargs="+", default=list(DEFAULT_SCALES), help="image pyramid scales")
    p.add_argument("--max_image_size", type=int, default=1024, help="larger images are first shrunk to this longest side")
    p.add_argument("--use_pca", type=str2bool, default=True, help="delf: reduce descriptors with the PCA file")
    p.add_argument("--pca_dims", type=int, default=40, help="delf: descriptor dimension after PCA")
    p.add_argument("--pca_parameters_path", help="the PCA file (default repo/<load_expr>/pca/pca.h5)")
    p.add_argument("--amp", **FLAG, help="bf16 autocast on CPU (fast only with avx512_bf16/AMX), fp16 on CUDA")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("pca", "delf"), default="delf", help="fit the PCA, or extract features")
    p.add_argument("--input_path", required=True, help="image folder (recursive) or a text file of image paths")
    p.add_argument("--output_path", help="pca: the PCA file (default: --pca_parameters_path); delf: the feature file")
    p.add_argument("--stage", choices=("inference",), default="inference", help="model stage (seed flag)")
    p.add_argument("--gpu_id", help="sets CUDA_VISIBLE_DEVICES (seed flag)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="seed flag; images differ in size, so they are processed one at a time")
    p.add_argument("--workers", type=int, default=1, help="image-decoding processes (0: decode in this one)")
    add_extraction_args(p)
    p.add_argument("--pca_max_features", type=int, default=100_000,
                   help="pca: uniform random sample of at most this many descriptors is fitted")
    p.add_argument("--seed", type=int, default=0, help="pca: seed of the descriptor sampling")
    p.add_argument("--save_attention", **FLAG, help="delf: also store the attention map at scale 1.0")
    p.add_argument("--overwrite", **FLAG, help="replace an existing output instead of resuming / refusing")
    return p


# --- paths -------------------------------------------------------------------------------------
def checkpoint_path(args: argparse.Namespace) -> Path:
    """--load_from, else fix.pth.tar of --load_expr, which must exist (with the cp command if not)."""
    if args.load_from:
        return Path(args.load_from)
    fix = repo_dir() / args.load_expr / "keypoint" / "ckpt" / "fix.pth.tar"
    if not fix.is_file():
        best = fix.with_name("bestshot.pth.tar")
        missing = "" if best.is_file() else f"\n({best} does not exist yet either: train the keypoint stage first.)"
        raise CheckpointError(
            f"{fix} not found.\nExtraction uses fix.pth.tar, a deliberate copy of the keypoint-stage checkpoint, "
            f"so that the model cannot change after the PCA was fitted. Make it with:\n  cp {best} {fix}{missing}")
    return fix


def pca_path(args: argparse.Namespace) -> Path:
    return Path(args.pca_parameters_path) if args.pca_parameters_path else repo_dir() / args.load_expr / "pca" / "pca.h5"


def features_path(args: argparse.Namespace) -> Path:
    if args.output_path:
        return Path(args.output_path)
    source = Path(args.input_path).resolve()
    return repo_dir() / args.load_expr / "features" / f"{source.stem if source.is_file() else source.name}.h5"


def part_path(output: Path, rank: int, world_size: int, suffix: str = "") -> Path:
    return output.with_name(f"{output.name}.part{rank}of{world_size}{suffix}")


# --- the run's report --------------------------------------------------------------------------
@dataclass
class Report:
    """Images extracted in this run, found already done, and skipped (path, reason)."""

    processed: int = 0
    existing: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def add(self, other: "Report") -> "Report":
        return Report(self.processed + other.processed, self.existing + other.existing,
                      sorted(self.skipped + other.skipped))

    def text(self, output: Path) -> str:
        lines = [f"{output}: {self.processed} images extracted, {self.existing} already there, "
                 f"{len(self.skipped)} skipped or without features"]
        lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines) + "\n"

    def save(self, output: Path) -> Path:
        path = output.with_suffix(".report.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.text(output))
        return path


# --- torchrun ----------------------------------------------------------------------------------
class Ranks:
    """This process's share of the work, and collectives on a gloo group whose timeout outlasts
    any extraction (the default process group may time out while ranks finish unevenly)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rank, self.size, self.is_main = runtime.rank, runtime.world_size, runtime.is_main
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=7)) if runtime.distributed else None

    def share(self, items: list[T]) -> list[T]:
        return items[self.rank::self.size]

    def from_main(self, fn: Callable[[], T]) -> T:
        """fn() run on rank 0; its result, or its expected error, on every rank."""
        box: list[Any] = [None]
        if self.is_main:
            try:
                box = [(True, fn())]
            except EXPECTED_ERRORS as e:
                box = [(False, e)]
        if self.group is not None:
            dist.broadcast_object_list(box, src=0, group=self.group)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def gather(self, obj: T) -> list[T]:
        """obj of every rank (a barrier too)."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


# --- extraction loop ---------------------------------------------------------------------------
def make_extractor(args: argparse.Namespace, device: torch.device, pca_file: Path | None) -> DelfExtractor:
    warn_if_slow_amp(device, args.amp)
    return DelfExtractor.from_checkpoint(
        checkpoint_path(args), pca_file, use_pca=pca_file is not None, pca_dims=args.pca_dims,
        scales=args.scale_list, attn_thres=args.attn_thres, iou_thres=args.iou_thres, top_k=args.top_k,
        max_image_size=args.max_image_size, device=device, amp=args.amp)


def build_extractor(args: argparse.Namespace) -> tuple[DelfExtractor, Path | None]:
    """(extractor, PCA file or None) from add_extraction_args' flags, built as the CLI builds it
    (fix.pth.tar rule, PCA/checkpoint sha256 check); for matcher.py and evaluate.py."""
    pca_file = pca_path(args) if args.use_pca else None
    return make_extractor(args, setup_runtime(args.device).device, pca_file), pca_file


def extract_all(ex: DelfExtractor, items: list[tuple[str, Path]], workers: int, report: Report,
                show_progress: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, features) of each usable image; the others go into ``report``.

    The decoding workers are forked here, at the call: open the output file afterwards, so that
    they never inherit it (orphaned workers of a killed run would keep it locked)."""
    decoded = iter(image_loader(items, workers)) if items else iter(())
    return _stream(ex, decoded, len(items), report, show_progress)


def _stream(ex: DelfExtractor, decoded: Iterator[tuple[str, Path, torch.Tensor | None, str | None]], total: int,
            report: Report, show_progress: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    with tqdm(total=total, unit="img", disable=not show_progress, dynamic_ncols=True) as bar:
        for name, path, image, reason in decoded:
            feats = _extract_one(ex, path, image, reason, report)
            if feats is not None:
                yield name, feats
            bar.update()


def _extract_one(ex: DelfExtractor, path: Path, image: torch.Tensor | None, reason: str | None,
                 report: Report) -> dict[str, Any] | None:
    if image is None:
        report.skip(path, str(reason))
        return None
    try:
        feats = ex(image)
    except Exception as e:  # one image must never cost the others
        log.warning("%s: extraction failed: %s", path, e)
        report.skip(path, f"extraction failed ({type(e).__name__}: {e})")
        return None
    small = too_small(image.shape[2], image.shape[1], ex.max_image_size)
    if small:
        report.skip(path, f"{small}; zero features")
    else:
        report.processed += 1
    return feats


def feature_attrs(args: argparse.Namespace, ex: DelfExtractor, pca_file: Path | None) -> dict[str, Any]:
    """Root attributes of the feature file: every extraction parameter and the sha256 sums."""
    return {
        "attn_thres": args.attn_thres, "iou_thres": args.iou_thres, "top_k": args.top_k,
        "scale_list": list(ex.scales), "max_image_size": args.max_image_size, "use_pca": pca_file is not None,
        "pca_dims": args.pca_dims if pca_file else 0, "descriptor_dim": ex.descriptor_dim, "amp": args.amp,
        "save_attention": args.save_attention, "arch": ex.model.arch, "target_layer": ex.model.target_layer,
        "receptive_field": [ex.receptive_field.size, ex.receptive_field.stride, ex.receptive_field.padding],
        "checkpoint_sha256": ex.checkpoint_sha256, "pca_sha256": file_sha256(pca_file) if pca_file else "",
        "input_path": str(Path(args.input_path).resolve()), "checkpoint": str(checkpoint_path(args).resolve()),
        "pca_parameters_path": str(pca_file.resolve()) if pca_file else "", "device": str(ex.device),
        "workers": args.workers, "batch_size": args.batch_size,
    }


def run_delf(args: argparse.Namespace, runtime: Runtime, ranks: Ranks) -> tuple[Report, Path]:
    items = list_images(args.input_path)
    pca_file = pca_path(args) if args.use_pca else None
    ex = make_extractor(args, runtime.device, pca_file)
    if args.save_attention and 1.0 not in ex.scales:
        raise ValueError("--save_attention stores the attention map at scale 1.0: add 1.0 to --scale_list")
    attrs, output = feature_attrs(args, ex, pca_file), features_path(args)
    done: set[str] = set()
    target = output
    if ranks.group is not None:  # each rank fills a part file; rank 0 merges them at the end
        done = set(ranks.from_main(lambda: _done(output, attrs, items, args.overwrite)))
        target = part_path(output, ranks.rank, ranks.size)
    mine = ranks.share([item for item in items if item[0] not in done])
    with FeatureWriter(target, attrs, overwrite=args.overwrite, informational=INFORMATIONAL) as writer:
        todo = [item for item in mine if not writer.has(item[0])]
    report = Report(existing=len(mine) - len(todo) + (len(done) if ranks.is_main else 0))
    stream = extract_all(ex, todo, args.workers, report, ranks.is_main)
    with FeatureWriter(target, attrs, informational=INFORMATIONAL) as writer:
        for name, feats in stream:
            writer.write(name, feats, save_attention=args.save_attention)
    reports = ranks.gather(report)
    if ranks.group is not None and ranks.is_main:
        _merge_parts(output, attrs, ranks.size)
    return _total(reports), output


def _done(output: Path, attrs: dict[str, Any], items: list[tuple[str, Path]], overwrite: bool) -> list[str]:
    with FeatureWriter(output, attrs, overwrite=overwrite, informational=INFORMATIONAL) as writer:
        return [name for name, _ in items if writer.has(name)]


def _merge_parts(output: Path, attrs: dict[str, Any], world_size: int) -> None:
    with FeatureWriter(output, attrs, informational=INFORMATIONAL) as writer:
        for rank in range(world_size):
            part = part_path(output, rank, world_size)
            for name, feats in iter_features(part):
                writer.write(name, feats, save_attention="attention" in feats)
            part.unlink()


def run_pca(args: argparse.Namespace, runtime: Runtime, ranks: Ranks) -> tuple[Report, Path]:
    output = Path(args.output_path) if args.output_path else pca_path(args)
    if output.exists() and not args.overwrite:
        raise PcaError(f"{output} exists: pass --overwrite to refit it (then extract the features again), "
                       "or choose another --output_path")
    if args.pca_max_features < 1:
        raise ValueError("--pca_max_features must be >= 1")
    items = list_images(args.input_path)
    ex = make_extractor(args, runtime.device, None)
    reservoir = Reservoir(args.pca_max_features, seed=args.seed + ranks.rank)
    report = Report()
    for _, feats in extract_all(ex, ranks.share(items), args.workers, report, ranks.is_main):
        reservoir.add(feats["descriptors"])
    sample = reservoir.sample
    if ranks.group is not None:
        np.save(part_path(output, ranks.rank, ranks.size, ".npy"), sample)
        seen = ranks.gather(reservoir.seen)
        report = _total(ranks.gather(report))
        if ranks.is_main:
            parts = [part_path(output, r, ranks.size, ".npy") for r in range(ranks.size)]
            sample = merge_samples([np.load(p, mmap_mode="r") for p in parts], seen, args.pca_max_features, args.seed)
            for p in parts:
                p.unlink()
    if ranks.is_main:
        params = fit_pca(sample)
        save_pca(output, params, {
            "checkpoint_sha256": ex.checkpoint_sha256, "num_features": len(sample), "num_images": report.processed,
            "checkpoint": str(checkpoint_path(args).resolve()), "input_path": str(Path(args.input_path).resolve()),
            "attn_thres": args.attn_thres, "iou_thres": args.iou_thres, "top_k": args.top_k,
            "scale_list": np.asarray(ex.scales), "max_image_size": args.max_image_size, "amp": args.amp,
            "pca_max_features": args.pca_max_features, "seed": args.seed, "arch": ex.model.arch,
            "target_layer": ex.model.target_layer})
        log.info("PCA of %d descriptors (%d-d) from %d images written to %s", len(sample), sample.shape[1],
                 report.processed, output)
    return report, output


def _total(reports: list[Report]) -> Report:
    total = Report()
    for r in reports:
        total = total.add(r)
    return total


# --- entry point -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the extractor with command-line ``argv``; returns the exit status (0: at least one image
    extracted or already in the output; 1: none, or an error, reported without a traceback)."""
    try:
        args = build_parser().parse_args(argv)
        runtime = setup_runtime(args.device, args.gpu_id)
    except SystemExit as e:  # argparse errors and --help; a bad --device
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return int(e.code or 0)
    setup_logging(runtime.is_main)
    if args.batch_size != 1:
        log.warning("--batch_size %d: images differ in size and are processed one at a time", args.batch_size)
    try:
        ranks = Ranks(runtime)
        report, output = (run_pca if args.mode == "pca" else run_delf)(args, runtime, ranks)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        teardown_runtime()
    if runtime.is_main:
        saved = report.save(output)
        print(report.text(output) + f"(report written to {saved})", end="\n")
    return 0 if report.processed + report.existing > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
