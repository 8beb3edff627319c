"""DELG benchmark (short runs; CPU model printed):

1. extraction cost of the global descriptor over the local pipeline: the same 7-scale pyramid
   with a DELG model (local + global at scales 0.7071, 1, 1.4142, sharing the pyramid's forward
   passes) vs without the global head, in FLOPs (exact) and time (``--repeats`` interleaved runs;
   0 skips the timing; goal: time ratio <= 1.10 at the default 1024x768, the size of Revisited
   Oxford / Paris images and the official max_image_size);
2. global search: 70 queries against 100 000 random unit 2048-d vectors, exact inner product
   (faiss), top 100 and the full ranking (what the evaluation scores).

    .venv/bin/python tests/bench/bench_delg.py [--threads N] [--skip_extract] [--db 100000]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from extract.retrieval.faiss_search import faiss_threads
from tests.bench.common import compare, machine_report, test_image, unit
from train.runtime import limit_threads


def flops(ex: Callable[[Image.Image], object], image: Image.Image) -> int:
    """Floating-point operations of one extraction (convolutions and matrix products; what the
    machine's load cannot blur)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        ex(image)
    return counter.get_total_flops()


def bench_extract(args: argparse.Namespace) -> None:
    from extract.extraction.delf_extractor import DelfExtractor
    from train.delg import Delg

    image = test_image(args.width, args.height)
    torch.manual_seed(0)
    for ae in (0, 128):
        model = Delg(10, arch="resnet50", autoencoder_dim=ae).eval()
        with_global = DelfExtractor(model)
        local_only = DelfExtractor(model, global_descriptor=False)
        f_local, f_global = flops(local_only, image), flops(with_global, image)
        print(f"extraction {args.width}x{args.height}, resnet50, 7 scales, autoencoder_dim {ae}: "
              f"{f_local / 1e9:.1f} vs {f_global / 1e9:.1f} GFLOP, ratio {f_global / f_local:.3f}")
        if args.repeats:
            t = compare({"local": lambda ex=local_only: ex(image), "local+global": lambda ex=with_global: ex(image)},
                        args.repeats)
            ratio = t['local+global'] / t['local']
            print(f"  time: local {t['local']:.3f} s, local+global {t['local+global']:.3f} s, "
                  f"ratio {ratio:.3f} (goal <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")


def bench_search(args: argparse.Namespace) -> None:
    from extract.retrieval.global_ranking import global_scores
    from extract.retrieval.vote import rank

    rng = np.random.default_rng(0)
    db = unit(rng.standard_normal((args.db, args.dim), dtype=np.float32))
    queries = unit(db[rng.choice(args.db, args.queries, replace=False)] + 0.05 * rng.standard_normal(
        (args.queries, args.dim), dtype=np.float32))
    top100 = lambda: faiss.knn(queries, db, 100, metric=faiss.METRIC_INNER_PRODUCT)  # noqa: E731
    full = lambda: np.stack([rank(s) for s in global_scores(db, queries)], axis=1)  # noqa: E731 (as evaluate.py)
    t = compare({"top100": top100, "full": full}, args.repeats)
    print(f"global search, {args.db} x {args.dim}-d database ({db.nbytes / 2**20:.0f} MiB float32), "
          f"{args.queries} queries, exact inner product (faiss): top-100 {t['top100'] * 1e3:.0f} ms "
          f"({t['top100'] / args.queries * 1e3:.2f} ms/query); full ranking {t['full'] * 1e3:.0f} ms "
          f"({t['full'] / args.queries * 1e3:.2f} ms/query)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--db", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--queries", type=int, default=70)
    p.add_argument("--skip_extract", action="store_true")
    p.add_argument("--skip_search", action="store_true")
    args = p.parse_args()
    print(f"{machine_report()}; {args.threads} thread(s)")
    with limit_threads(args.threads), faiss_threads(args.threads):
        if not args.skip_extract:
            bench_extract(args)
        if not args.skip_search:
            bench_search(args)


if __name__ == "__main__":
    main()
