"""Benchmark: the stored ASMK* index (extract/retrieval/asmk/stored_index.py) built by 1 and 2
processes as torchrun runs it (gloo; each process aggregates its share of the images into its own
part of the forward store, process 0 merges the parts and writes the inverted file), extrapolated to
ROxf+1M for 1, 2 and 8 processes.

Synthetic data as bench_retrieval.py's stored part: 40-D, 65 536 words, 1 000 descriptors per image
drawn from 400 scenes' pools of Zipf-popular words (~730 distinct words per image). Two builds per
process count, each into an empty folder:

- assigned: --assigned_images images whose words the project's assignment finds, as the evaluation
  does (VisualWords, --assignment auto: HNSW at 40-D), faiss threads: the cores shared among the
  processes: the word assignment, aggregation and appending to the parts (most of the build);
- given: --images images whose words are the ones they were generated from (bench_retrieval.py's
  GivenWords: exact assignment of 100M descriptors would take days here): the same at scale,
  then process 0's merge of the parts (none with one process) and the inverted file.

The inverted files of each kind of build are compared across process counts (sha256 of their bytes).

Each process's time spent generating descriptors (the evaluation reads them from its feature files
or gets them from the extraction) is measured and left out of the shared phase. The extrapolation:
ROxf+1M's 1 005 994 images (ROxf's 4 993 and revisitop's 1 001 001 distractors) times the assigned
build's time per image with N processes, plus the given build's merge and inverted file scaled
linearly from --images; 8 processes: 8 free cores, each process as fast as one of the two measured
(the assignment is per image, nothing shared), the merge and the inverted file as with 2 processes.

    .venv/bin/python tests/bench/bench_index_build.py [--images 100000] [--assigned_images 2000]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import faiss
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from extract.config import AsmkConfig
from extract.extraction.workshare import WorkShare
from extract.retrieval.asmk.codebook import VisualWords
from extract.retrieval.asmk.stored_index import IndexBuild
from extract.retrieval.faiss_search import faiss_threads
from tests.bench.bench_retrieval import GivenWords, SceneDatabase, clustered
from tests.bench.common import machine_report
from train.runtime import Runtime

ROXF_1M = 4993 + 1_001_001   # ROxf's database and revisitop's distractors


def build(rank: int, size: int, job: dict[str, Any]) -> None:
    """Process ``rank`` of ``size``: the index of ``job["images"]`` images in ``job["folder"]``;
    process 0 writes its times (s) to ``job["report"]``."""
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{job['rendezvous']}", rank=rank, world_size=size)
    try:
        share = WorkShare.join(Runtime(torch.device("cpu"), rank, size))
        centroids = clustered(job["words"], job["dim"], seed=4)
        data, cfg = SceneDatabase(centroids), AsmkConfig(codebook_size=job["words"])
        words = GivenWords(centroids, AsmkConfig(assignment="exact")) if job["given"] else VisualWords(centroids, cfg)
        generating = [0.0]

        def descriptors(keys: Sequence[str]) -> Iterator[Any]:
            for key in keys:
                t = time.perf_counter()
                image_words, x = data.image(int(key))
                generating[0] += time.perf_counter() - t
                if job["given"]:
                    words.pending = image_words
                yield x

        keys = [str(i) for i in range(job["images"])]
        with faiss_threads(job["threads"]):
            start = time.perf_counter()
            with IndexBuild(job["folder"], words, cfg, share=share) as index_build:
                index_build.append_share(keys, descriptors)
                shared = time.perf_counter() - start - generating[0]
                shares = share.gather(shared)   # every part committed
                done = time.perf_counter()
                index, order, _ = index_build.finish(keys)
                finish = time.perf_counter() - done
        if share.is_main:
            assert order == keys
            Path(job["report"]).write_text(json.dumps({"shared": max(shares), "finish": finish,
                                                       "entries": index.num_entries, "images": index.num_images}))
    finally:
        if size > 1:
            dist.destroy_process_group()


def run(tmp: Path, procs: int, images: int, given: bool, args: argparse.Namespace) -> dict[str, float]:
    """The times of one build by ``procs`` processes (spawned, gloo) into a fresh folder."""
    tag = f"{'given' if given else 'assigned'}-{procs}"
    job = {"folder": str(tmp / tag), "report": str(tmp / f"{tag}.json"), "rendezvous": str(tmp / f"{tag}.rdv"),
           "images": images, "given": given, "words": args.codebook_size, "dim": args.dim,
           "threads": max(1, args.cores // procs)}
    if procs == 1:
        build(0, 1, job)
    else:
        mp.spawn(build, args=(procs, job), nprocs=procs)
    return {**json.loads(Path(job["report"]).read_text()), "sha256": inverted_sha256(Path(job["folder"]))}


def inverted_sha256(folder: Path) -> str:
    """sha256 of the names and bytes of the inverted file's files, in name order."""
    digest = hashlib.sha256()
    for path in sorted((folder / "inverted").iterdir()):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100_000, help="images of the build with given words")
    p.add_argument("--assigned_images", type=int, default=2000, help="images of the build with assigned words")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts measured")
    p.add_argument("--codebook_size", type=int, default=AsmkConfig.codebook_size)
    p.add_argument("--dim", type=int, default=40)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="faiss threads shared among the processes (cores // processes each)")
    p.add_argument("--tmp", help="folder for the indexes (default: the system's temporary folder)")
    args = p.parse_args()
    print(f"{machine_report()}; faiss {faiss.__version__}")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"{args.dim}-D, {args.codebook_size} words; assigned: {args.assigned_images} images, given: {args.images}")
    times: dict[tuple[bool, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for given, images in ((False, args.assigned_images), (True, args.images)):
            for procs in args.procs:
                t = times[given, procs] = run(Path(tmp), procs, images, given, args)
                what = "words given" if given else "words assigned (HNSW)"
                print(f"{images} images, {what}, {procs} process(es) ({max(1, args.cores // procs)} faiss threads "
                      f"each): shared phase {t['shared']:.1f} s ({t['shared'] / images * 1e3:.2f} ms per image), "
                      f"merge and inverted file {t['finish']:.1f} s; {t['entries'] / t['images']:.0f} distinct "
                      f"words per image", flush=True)
    one, two = args.procs[0], args.procs[-1]
    for given in (False, True):
        a, b = times[given, one], times[given, two]
        whole = (a["shared"] + a["finish"]) / (b["shared"] + b["finish"])
        print(f"speed-up {two} / {one} processes, {'given' if given else 'assigned'} words: shared phase "
              f"{a['shared'] / b['shared']:.2f}x, whole build {whole:.2f}x; inverted files byte-identical: "
              f"{a['sha256'] == b['sha256']}")
    per_image = {n: times[False, n]["shared"] / args.assigned_images for n in args.procs}
    per_image[8] = per_image[two] * two / 8
    print(f"ROxf+1M ({ROXF_1M} images), extrapolated: the shared phase at the assigned build's time per image, the "
          f"merge and inverted file linear from {args.images} images; 8 processes: 8 free cores, each process as "
          f"fast as one of {two}, the merge as with {two}")
    for n in (*args.procs, 8):
        finish = times[True, min(n, two)]["finish"] * ROXF_1M / args.images
        shared = per_image[n] * ROXF_1M
        print(f"  {n} process(es): {(shared + finish) / 3600:.1f} h = shared phase {shared / 3600:.1f} h + merge and "
              f"inverted file {finish / 60:.0f} min")


if __name__ == "__main__":
    main()
