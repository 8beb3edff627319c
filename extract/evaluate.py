"""Retrieval evaluation on Revisited Oxford / Paris: mAP and mP@1/5/10, Easy / Medium / Hard,
exactly as revisitop computes them (extract/evaluation/metrics.py).

Score a ranking made by any method (revisitop's convention: (database size, queries), 0-based,
best first):

    python extract/evaluate.py --dataset roxford5k --data_root R --ranks ranks.npy --output res.json

or run DeLF end to end: database and cropped-query features (cached in HDF5, resumable), initial
ranking by ASMK* (codebook trained on --codebook_images, e.g. the other dataset's images) or by
k-NN descriptor votes (--method vote), re-ranking of the top --rerank images by RANSAC inliers
(each protocol's junk removed first), then the scores; --distractors adds images to the database.
The ASMK* index is stored beside the codebook (extract/retrieval/asmk/stored_index.py), built once and reused;
distractors that the evaluation extracts are aggregated into it as they are extracted. Under
``torchrun --nproc_per_node N`` (also across nodes) the processes share the distractors' extraction
and the index build; process 0 does the rest and prints the scores:

    python extract/evaluate.py --dataset roxford5k --data_root R --load_expr delf \
        --codebook_images R/rparis6k/jpg --output res.json

With a DELG checkpoint, --method global ranks by the global descriptors' inner products and
--method global+sp re-ranks the top of that ranking with the local features:

    python extract/evaluate.py --dataset roxford5k --data_root R --load_from DELG.pth.tar \
        --use_pca false --method global+sp --output res.json

R holds <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/<name>.jpg, as revisitop distributes them
(extract/evaluation/revisitop.py). --output's JSON holds the scores and the resolved settings ("config");
--figures DIR draws each query's top 10 and the per-query AP (extract/evaluation/figures.py); --config FILE
reads flags from a TOML file (configs/ holds the published setups). From Python:
extract/evaluation/evaluate_dataset.py (``evaluate_dataset``, ``score_ranking``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from extract.config import EvalConfig, MatchConfig, dataset_features_dir
from extract.errors import UserError
from extract.evaluation.metrics import evaluate, format_rows, format_table
from extract.evaluation.revisitop import DATASETS, Dataset, EvalError, check_images, load_dataset, load_ranks
from extract.flags import add_extraction_args, add_match_args, model_files
from train.cli import (
    ScriptParser,
    add_bool_flag,
    add_config_args,
    add_config_file_arg,
    config_from_args,
    parse_args_given,
)

if TYPE_CHECKING:
    import numpy as np

    from extract.evaluation.evaluate_dataset import Scores

log = logging.getLogger("delf")


# --- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description="Revisited Oxford/Paris evaluation (mAP, mP@k; E/M/H).")
    add_config_file_arg(p)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--data_root", type=Path, required=True,
                   help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    p.add_argument("--ranks", type=Path, help="score this ranking (.npy, database x queries, 0-based)"
                   " instead of running DeLF")
    p.add_argument("--output", type=Path, help="write the scores (percent) and the settings as JSON here")
    p.add_argument("--figures", type=Path, metavar="DIR",
                   help="draw each query's crop and top 10 before and after spatial verification (frames: green "
                        "positive, red negative, grey junk; Medium protocol) and a chart of per-query AP into DIR")
    p.add_argument("--features_dir", type=Path,
                   help="feature cache (default repo/<load_expr>/features/<dataset>)")
    add_bool_flag(p, "--overwrite", default=False,
                  help="extract again, replacing cached features made with other parameters, and rebuild the "
                       "ASMK* index (e.g. a corrupt one)")
    r = p.add_argument_group("ranking and re-ranking")
    add_config_args(r, EvalConfig)
    r.add_argument("--codebook_images", type=Path,
                   help="asmk: image folder or list to train the codebook on (e.g. R/rparis6k/jpg for "
                        "roxford5k); the codebook is kept in repo/<load_expr>/asmk/")
    r.add_argument("--distractors", type=Path,
                   help="image folder or list added to the database (e.g. revisitop's 1M distractors)")
    add_match_args(r)
    add_extraction_args(p.add_argument_group("extraction (as extract/extractor.py)"))
    return p


@dataclass
class Outcome:
    """What one command computed: the final scores, the initial ranking's (None for a given
    ranking), the resolved settings, and the rankings to draw (label -> (database size, queries);
    after re-ranking, the Medium protocol's); database image i >= len(imlist) is distractor
    ``distractor_names[i - len(imlist)]``."""

    final: Scores
    initial: Scores | None
    settings: dict[str, Any]
    rankings: dict[str, np.ndarray]
    distractor_names: Sequence[str] = ()


def run(args: argparse.Namespace) -> None:
    """The evaluation the flags describe: prints the score tables, writes --output (scores and
    the resolved settings) and --figures."""
    from extract.evaluation.evaluate_dataset import write_json
    from extract.evaluation.figures import make_folder, write_figures
    from extract.extraction.images import image_path

    ds = load_dataset(args.data_root, args.dataset)
    if args.figures is not None:  # before the work, not after it
        check_images(ds)
        make_folder(args.figures)
    out = score_given(args, ds) if args.ranks is not None else run_delf(args, ds)
    if out is None:   # a process of torchrun's other than 0
        return
    if args.output is not None:
        write_json(out.final, args.output, out.initial, out.settings)
        print(f"wrote {args.output}")
    if args.figures is not None:
        n = len(ds.imlist)

        def database_image(i: int) -> Path:
            return ds.path(ds.imlist[i]) if i < n else image_path(args.distractors, out.distractor_names[i - n])

        written = write_figures(ds, out.rankings, args.figures, database_image)
        print(f"wrote {len(written)} figures to {args.figures}")


def score_given(args: argparse.Namespace, ds: Dataset) -> Outcome:
    """The scores of the --ranks ranking; prints the table."""
    ranks = load_ranks(args.ranks, ds)
    results = evaluate(ranks, ds.gnd)
    print(f"{ds.name}: given ranking\n{format_table(results)}")
    return Outcome(results, None, {"dataset": ds.name, "data_root": args.data_root, "ranks": args.ranks},
                   {"given ranking": ranks})


def run_delf(args: argparse.Namespace, ds: Dataset) -> Outcome | None:
    """DeLF end to end as the flags describe; prints the tables. Under torchrun the processes share
    the distractors' extraction and the ASMK* index build (evaluate_dataset); process 0 prints and
    returns the outcome, the others None."""
    from extract.evaluation.evaluate_dataset import METHOD_NAMES, evaluate_dataset, require_codebook_images
    from extract.extraction.workshare import WorkShare
    from train.runtime import repo_dir, setup_runtime

    conf = config_from_args(EvalConfig, args)
    require_codebook_images(conf, args.codebook_images)
    for flag, images in (("--codebook_images", args.codebook_images if conf.method == "asmk" else None),
                         ("--distractors", args.distractors)):
        if images is not None and not images.exists():  # before hours of extraction, not after
            raise UserError(f"{flag} {images}: no such folder or image list")
    check_images(ds)
    runtime = setup_runtime(args.device, backend="gloo")   # under torchrun: its collectives are on the CPU
    share = WorkShare.join(runtime)
    (extraction, checkpoint, pca_file), device = model_files(args), runtime.device
    matching = config_from_args(MatchConfig, args)
    features_dir = args.features_dir or dataset_features_dir(args.load_expr, ds.name)
    settings = {"dataset": ds.name, "data_root": args.data_root, "checkpoint": checkpoint, "pca": pca_file,
                "features_dir": features_dir, "codebook_images": args.codebook_images,
                "distractors": args.distractors, "evaluation": asdict(conf), "matching": asdict(matching),
                "extraction": asdict(extraction)}
    result = evaluate_dataset(
        ds, checkpoint, features_dir, pca_path=pca_file, extraction=extraction, matching=matching, conf=conf,
        codebook_images=args.codebook_images, distractors=args.distractors,
        codebook_dir=repo_dir() / args.load_expr / "asmk", overwrite=args.overwrite, device=device, share=share)
    if result is None:
        return None
    assert result.initial_ranks is not None
    name = METHOD_NAMES[conf.method]
    where = ds.name + (f" + {result.distractors} distractors" if result.distractors else "")
    print(f"{where}: {name} index {result.index_bytes / 2**20:.1f} MiB, "
          f"{result.index_bytes / max(result.database_size, 1) / 1e3:.1f} kB per database image")
    rows = {name: result.initial}
    rankings = {name: result.initial_ranks}
    print(f"{where}: {name} (initial ranking)\n{format_table(result.initial)}")
    if conf.reranks:
        rows[f"{name}+SP"] = result.final
        rankings[f"{name}+SP"] = result.final_ranks["medium"]
        print(f"{where}: {name}+SP (spatial verification of the top {conf.rerank})\n"
              f"{format_table(result.final)}")
    print(f"{where}, as the papers' tables (mAP, mP@10):\n{format_rows(rows)}")
    return Outcome(result.final, result.initial, settings, rankings, result.distractor_names)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate; returns the exit status (1 on an error, printed without a traceback)."""
    args = parse_args_given(build_parser(), argv)
    # the flags first, then torch: --help and a bad flag need no torch
    from extract.extraction.feature_file import FeatureFileError
    from extract.extraction.pca import PcaError
    from extract.retrieval.asmk.codebook import CodebookError
    from train.checkpoint import CheckpointError
    from train.runtime import teardown_runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        run(args)
    except (EvalError, FeatureFileError, CheckpointError, PcaError, CodebookError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        teardown_runtime()   # under torchrun
    return 0


if __name__ == "__main__":
    sys.exit(main())
