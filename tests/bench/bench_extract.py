"""Extraction benchmark: resnet50 layer3, 7 scales, random-init keypoint model, real photos.

attn_thres 0: every cell is a candidate, the worst case for selection, NMS and PCA.
1. RSS while extracting 200 images into a feature file (flat: after 20 vs after 200);
2. pipeline time / bare backbone+attention forward over the same pyramid (goal <= 1.05);
3. --amp (bf16 autocast on CPU) speed-up over fp32, with agreement (keypoints in common,
   mean descriptor cosine);
5. --layout slim (the official DELF models' network, as extract/convert_official.py converts it, with the
   official extraction settings: TF1 resize, official boxes) beside the default torchvision layout;
4. throughput: images/s of extract_features (JPEG decoding and shrinking in the DataLoader
   workers, pinned memory, HDF5 writes) on 1024 px photos, 7 scales, PCA to 40-d, on --device
   (CUDA when present; goal >= 20 img/s on an H100), and of the pipeline alone on decoded images.

    .venv/bin/python tests/bench/bench_extract.py [--threads N] [--skip_amp] [--rss_images 200]
    .venv/bin/python tests/bench/bench_extract.py --only_layouts
    .venv/bin/python tests/bench/bench_extract.py --only_throughput --device cuda [--images 300]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from extract.config import DEFAULT_SCALES, ExtractionConfig
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.extract_features import default_workers, extract_features
from extract.extraction.feature_file import FeatureWriter
from extract.extraction.pca import fit_pca, save_pca
from tests.bench.common import compare, machine_report, test_image, timed
from tests.utils import PHOTOS, save_keypoint_checkpoint
from train.delf import Delf
from train.outputs import file_sha256
from train.runtime import limit_threads, native_bf16


def bare_forward(model: Delf, ex: DelfExtractor, image: Image.Image) -> Callable[[], None]:
    """``model`` alone (backbone + attention) over the pyramid the pipeline builds (made beforehand)."""
    base, size = ex.prepare(image)
    levels = [ex.scale_image(base, s, size)[0][None].contiguous(memory_format=torch.channels_last) for s in ex.scales]

    @torch.inference_mode()
    def run() -> None:
        for x in levels:
            model.extract(x)
    return run


def agreement(ref: dict, other: dict) -> tuple[float, float]:
    """Fraction of ref keypoints (with scale) also in other; mean cosine of their descriptors."""
    index = {(x, y, s): i for (x, y), s, i in zip(other["keypoints"].tolist(), other["scales"].tolist(),
                                                  range(len(other["scales"])), strict=True)}
    pairs = [(i, index[(x, y, s)])
             for (x, y), s, i in zip(ref["keypoints"].tolist(), ref["scales"].tolist(), range(len(ref["scales"])),
                                     strict=True) if (x, y, s) in index]
    a, b = (np.array(p) for p in zip(*pairs, strict=True))
    cos = (ref["descriptors"][a] * other["descriptors"][b]).sum(1)
    return len(pairs) / len(ref["scores"]), float(cos.mean())


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip_amp", action="store_true")
    p.add_argument("--rss_images", type=int, default=200)
    p.add_argument("--rss_size", type=int, default=128, help="longest side of the RSS-run images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="throughput device (default: cuda when present)")
    p.add_argument("--images", type=int, help="throughput images (default 300 on CUDA, 6 on CPU)")
    p.add_argument("--workers", type=int, help="decoding processes (default: the extractor's)")
    p.add_argument("--only_throughput", action="store_true", help="run section 4 only")
    p.add_argument("--only_layouts", action="store_true", help="run section 5 only")
    args = p.parse_args()
    print(machine_report())
    with limit_threads(args.threads):
        pca = fit_pca(np.random.default_rng(0).standard_normal((4096, 1024)).astype(np.float32))
        if not (args.only_throughput or args.only_layouts):
            run(args, pca)
        if not args.only_layouts:
            throughput(args, pca)
        if not args.only_throughput:
            layouts(args, pca)


def layouts(args: argparse.Namespace, pca: dict[str, np.ndarray]) -> None:
    """Section 5: the pipeline with a slim-layout model (a converted official one, random weights)
    and the official settings, beside the default torchvision layout, on CPU."""
    from extract.official.convert import OFFICIAL_EXTRACTION, new_model

    torch.manual_seed(0)
    native = Delf(10, arch="resnet50", stage="inference", target_layer="layer3").eval()
    official = {k: tuple(v) if isinstance(v, list) else v for k, v in OFFICIAL_EXTRACTION.items()}
    extractors = {"torchvision": DelfExtractor(native, ExtractionConfig(attn_thres=0.0), pca=pca),
                  "slim": DelfExtractor(new_model(), ExtractionConfig(**{**official, "attn_thres": 0.0}), pca=pca)}
    print(f"\n5. layouts: resnet50 to layer3 / block3, attn_thres 0, top_k 1000, PCA 40; torchvision with this "
          f"project's settings, slim with the official ones (medians of {args.repeats} interleaved runs)")
    for width, height in ((512, 384), (1024, 768)):
        image = test_image(width, height)
        t = compare({name: lambda ex=ex, image=image: ex(image) for name, ex in extractors.items()}, args.repeats)
        cells = {name: sum(a.size for a in ex(image)["attention"]) for name, ex in extractors.items()}
        print(f"   {width}x{height}: torchvision {t['torchvision']:.2f} s ({cells['torchvision']} cells), slim "
              f"{t['slim']:.2f} s ({cells['slim']} cells): slim / torchvision {t['slim'] / t['torchvision']:.3f}")


def throughput(args: argparse.Namespace, pca_params: dict[str, np.ndarray]) -> None:
    """Section 4: images/s end to end (extract_features) and of the pipeline alone, with PCA
    ``pca_params``."""
    device = torch.device(args.device)
    n = args.images or (300 if device.type == "cuda" else 6)
    workers = default_workers(device) if args.workers is None else args.workers
    print(f"\n4. throughput on {device}: {n} JPEGs of 1024x768, resnet50 layer3, 7 scales, PCA 40, "
          f"attn_thres 0, top_k 1000, {workers} decoding workers")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ckpt = save_keypoint_checkpoint(tmp_path / "ckpt.pth.tar", arch="resnet50", ncls=10)
        pca = tmp_path / "pca.h5"
        save_pca(pca, pca_params, {"checkpoint_sha256": file_sha256(ckpt)})
        folder = tmp_path / "imgs"
        folder.mkdir()
        for i in range(n):  # distinct files (crops of the photos), as a real folder would be
            img = test_image(1100, 820, PHOTOS[i % len(PHOTOS)]).crop((i % 50, i % 40, i % 50 + 1024, i % 40 + 768))
            img.save(folder / f"{i:05d}.jpg", quality=90)
        warm = tmp_path / "warm"
        warm.mkdir()
        for f in sorted(folder.iterdir())[:3]:
            (warm / f.name).symlink_to(f)
        image = torch.from_numpy(np.array(Image.open(folder / "00000.jpg").convert("RGB"))).permute(2, 0, 1)
        image = image.pin_memory() if device.type == "cuda" else image
        for amp in (False, True) if device.type == "cuda" else (False,):
            conf = ExtractionConfig(attn_thres=0.0, amp=amp)
            label = "fp16 autocast (--amp)" if amp else "fp32"
            extract_features(conf, ckpt, warm, tmp_path / f"warm{amp}.h5", pca_path=pca, workers=workers,
                             device=device)
            sync(device)
            start = time.perf_counter()
            report = extract_features(conf, ckpt, folder, tmp_path / f"f{amp}.h5", pca_path=pca, workers=workers,
                                      device=device)
            sync(device)
            seconds = time.perf_counter() - start
            print(f"   {label}: extract_features {report.processed} images in {seconds:.1f} s = "
                  f"{report.processed / seconds:.3g} img/s (goal on an H100: >= 20)")
            ex = DelfExtractor.from_checkpoint(ckpt, pca, conf, device=device)
            t = compare({"pipeline": lambda ex=ex: ex(image)}, max(3, min(20, n)))["pipeline"]
            print(f"   {label}: pipeline alone (decoded image, {len(ex(image)['scores'])} features) "
                  f"{t * 1000:.0f} ms = {1 / t:.3g} img/s")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace, pca: dict[str, np.ndarray]) -> None:
    """Sections 1-3 on CPU, with PCA ``pca``."""
    torch.manual_seed(0)
    model = Delf(10, arch="resnet50", stage="inference", target_layer="layer3").eval()
    ex = DelfExtractor(model, ExtractionConfig(attn_thres=0.0), pca=pca)
    print(f"{args.threads} threads, ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {native_bf16()}; resnet50 layer3, scales {list(DEFAULT_SCALES)}, attn_thres 0, top_k 1000")

    print(f"\n1. RSS over {args.rss_images} images (longest side {args.rss_size} px) written to a feature file")
    sizes = [(args.rss_size, round(args.rss_size * r)) for r in (0.75, 0.6, 1.0, 0.5)]
    with tempfile.TemporaryDirectory() as tmp, FeatureWriter(Path(tmp) / "f.h5", {"bench": 1}) as writer:
        photos = [test_image(w, h, name) for name in PHOTOS[:5] for w, h in sizes]
        for i in range(args.rss_images):
            writer.write(f"img{i:04d}.jpg", ex(photos[i % len(photos)]))
            if i + 1 in (20, args.rss_images):
                print(f"   after {i + 1:4d} images: RSS {rss_mib():.0f} MiB, peak "
                      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    print(f"\n2. pipeline vs bare forward of its network (BatchNorm folded), and of the unfolded model "
          f"(medians of {args.repeats} interleaved runs)")
    model.to(memory_format=torch.channels_last)
    for width, height in ((512, 384), (1024, 768)):
        image = test_image(width, height)
        t = compare({"pipeline": lambda image=image: ex(image), "bare": bare_forward(ex.model, ex, image),
                     "unfolded": bare_forward(model, ex, image)}, args.repeats)
        n = len(ex(image)["scores"])
        print(f"   {width}x{height}: pipeline {t['pipeline']:.2f} s, bare forward {t['bare']:.2f} s "
              f"(ratio {t['pipeline'] / t['bare']:.3f}), unfolded model {t['unfolded']:.2f} s "
              f"(ratio {t['pipeline'] / t['unfolded']:.3f}); {n} features")

    if not args.skip_amp:
        print("\n3. --amp (bf16 autocast, channels_last) vs fp32, 512x384 (bf16: one run, no warm-up)")
        image = test_image(512, 384)
        amp = DelfExtractor(model, ExtractionConfig(attn_thres=0.0, amp=True), pca=pca)
        t32 = compare({"fp32": lambda: ex(image)}, 1)["fp32"]
        f16, t16, _ = timed(amp, image)
        common, cos = agreement(ex(image), f16)
        print(f"   fp32 {t32:.2f} s, bf16 {t16:.2f} s: speed-up {t32 / t16:.2f}x; keypoints in common "
              f"{100 * common:.1f} %, mean descriptor cosine {cos:.4f}")


if __name__ == "__main__":
    main()
