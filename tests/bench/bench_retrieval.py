"""Benchmark: retrieval on synthetic DeLF-like features, 5,000 database images x 1,000
descriptors x 40 dims (the size of Revisited Oxford with DeLF).

Reports index build time and memory, initial ranking (k-NN votes) per query and re-ranking of
the top 100 images per query (matching + RANSAC). Goal: <= 0.5 s per query for both.

    .venv/bin/python tests/bench/bench_retrieval.py [--images 5000] [--queries 20]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import os
import resource
import time

import numpy as np
import torch

from extract.retrieval import Database, DescriptorIndex, Verifier, rank, rerank

DIM, PER_IMAGE, SIZE = 40, 1000, 1024.0


def rss_gb() -> float:
    """Peak resident memory of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def database(n_images: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random unit descriptors and uniform keypoints, one block per image (views of one array)."""
    g = torch.Generator().manual_seed(seed)
    desc = torch.nn.functional.normalize(torch.randn(n_images * PER_IMAGE, DIM, generator=g), dim=1)
    kp = torch.rand(n_images * PER_IMAGE, 2, generator=g) * SIZE
    return list(np.split(desc.numpy(), n_images)), list(np.split(kp.numpy(), n_images))


def query(desc: np.ndarray, kp: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Half of a database image's features seen through an affine warp (noisy), half clutter."""
    half = PER_IMAGE // 2
    a = np.array([[0.8, 0.15, 60.0], [-0.1, 0.85, 40.0]])
    d = desc[:half] + 0.1 * rng.normal(size=(half, DIM))
    d = np.concatenate([d, rng.normal(size=(PER_IMAGE - half, DIM))])
    k = np.concatenate([kp[:half] @ a[:, :2].T + a[:, 2] + rng.normal(0, 2, (half, 2)),
                        rng.uniform(0, SIZE, (PER_IMAGE - half, 2))])
    return {"descriptors": (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32),
            "keypoints": k.astype(np.float32)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--knn", type=int, default=10)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16])
    p.add_argument("--rerank", type=int, default=100)
    args = p.parse_args()
    rng = np.random.default_rng(0)

    t = time.perf_counter()
    descs, kps = database(args.images)
    print(f"synthetic database: {args.images} images x {PER_IMAGE} x {DIM}-d "
          f"({time.perf_counter() - t:.1f} s), torch threads {torch.get_num_threads()}")
    rss0 = rss_gb()
    t = time.perf_counter()
    index = DescriptorIndex(descs, nlist=0)
    build = time.perf_counter() - t
    print(f"index build: {build:.1f} s, {index.nlist} cells, index {index.nbytes / 2**30:.2f} GiB, "
          f"peak RSS +{rss_gb() - rss0:.2f} GiB during build")
    db = Database(kps, index)
    del descs
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine); "
          f"search and matching run on one thread")
    targets = rng.choice(args.images, args.queries, replace=False)
    queries = [query(index.image_descriptors(i), kps[i], rng) for i in targets]

    for nprobe in args.nprobe:
        t, c = time.perf_counter(), time.process_time()
        scores = db.initial_scores([q["descriptors"] for q in queries], args.knn, nprobe)
        t_rank = (time.perf_counter() - t) / args.queries
        c_rank = (time.process_time() - c) / args.queries
        orders = [rank(s) for s in scores]
        top1 = np.mean([o[0] == i for o, i in zip(orders, targets, strict=True)])
        t, c = time.perf_counter(), time.process_time()
        final = [rerank(o, s, Verifier(q, db.features), args.rerank)
                 for o, s, q in zip(orders, scores, queries, strict=True)]
        t_rerank = (time.perf_counter() - t) / args.queries
        c_rerank = (time.process_time() - c) / args.queries
        top1_after = np.mean([o[0] == i for o, i in zip(final, targets, strict=True)])
        total = t_rank + t_rerank
        print(f"nprobe {nprobe:3d}: initial ranking {t_rank * 1e3:6.0f} ms/query "
              f"(top-1 {top1:.0%}), re-ranking top {args.rerank} {t_rerank * 1e3:6.0f} ms/query "
              f"(top-1 {top1_after:.0%}); total {total:.3f} s/query "
              f"(goal <= 0.5 s: {'met' if total <= 0.5 else 'NOT met'}); "
              f"CPU time {c_rank + c_rerank:.3f} s/query")


if __name__ == "__main__":
    main()
