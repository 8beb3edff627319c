"""Extraction benchmark: resnet50 layer3, 7 scales, random-init keypoint model, real photos.

attn_thres 0: every cell is a candidate, the worst case for selection, NMS and PCA.
1. RSS while extracting 200 images into a feature file (flat: after 20 vs after 200);
2. pipeline time / bare backbone+attention forward over the same pyramid (goal <= 1.05);
3. precision, in process, on the same image at 512x384 and 1024x768, DeLF (resnet50 layer3, PCA 40)
   and DELG (resnet50, local + global): fp32, bf16 autocast (what --amp was on CPU) and pure bf16
   (what --amp is on a CPU with native bf16: bf16 weights, no autocast), the bf16 network alone over
   the same pyramid as the floor; agreement with fp32 (keypoints in common at the same place and
   scale, mean descriptor cosine, counts; DELG: global descriptor cosine). Goal on an AMX CPU:
   pure bf16 >= 2.8x fp32 at 1024x768;
6. with --seed_checkout DIR (a checkout of nashory/DeLF-pytorch): the whole extractor process with
   --amp, and without, against the seed's extraction of the same 1024x768 image in a process of its
   own (its model class and extraction function, with its settings); goal on an AMX CPU: >= 8x;
7. bf16 for the products beside the network: PCA projection per image, the matcher's distance
   product per pair, the PCA fit's covariance (measured; none of them uses bf16);
5. --layout slim (the official DELF models' network, as extract/convert_official.py converts it, with the
   official extraction settings: TF1 resize, official boxes) beside the default torchvision layout;
4. throughput: images/s of extract_features (JPEG decoding and shrinking in the DataLoader
   workers, pinned memory, HDF5 writes) on 1024 px photos, 7 scales, PCA to 40-d, on --device
   (CUDA when present; goal >= 20 img/s on an H100), and of the pipeline alone on decoded images.

    .venv/bin/python tests/bench/bench_extract.py [--threads N] [--skip_amp] [--rss_images 200]
    .venv/bin/python tests/bench/bench_extract.py --only_precision [--seed_checkout DIR] [--repeats 3]
    .venv/bin/python tests/bench/bench_extract.py --only_layouts
    .venv/bin/python tests/bench/bench_extract.py --only_throughput --device cuda [--images 300]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
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
from extract.extraction.pca import apply_pca, fit_pca, save_pca
from tests.bench.common import compare, machine_report, test_image
from tests.utils import PHOTOS, save_keypoint_checkpoint
from train.delf import Delf
from train.delg import Delg
from train.outputs import file_sha256
from train.runtime import BF16_CPU_FLAGS, PROJECT_ROOT, cpu_flags, limit_threads, native_bf16

SIZES = ((512, 384), (1024, 768))


def bare_forward(model: Delf, ex: DelfExtractor, image: Image.Image) -> Callable[[], None]:
    """``model`` alone (backbone + attention) over the pyramid the pipeline builds (made beforehand)."""
    base, size = ex.prepare(image)
    levels = [ex.scale_image(base, s, size)[0][None].contiguous(memory_format=torch.channels_last) for s in ex.scales]

    @torch.inference_mode()
    def run() -> None:
        for x in levels:
            model.extract(x)
    return run


def network_passes(ex: DelfExtractor, image: Image.Image) -> Callable[[], None]:
    """The forward passes ``ex`` makes for ``image`` (its pyramid, made beforehand; with a DELG model
    also layer4 and the global head at the global scales), and nothing else."""
    base, size = ex.prepare(image)
    levels = [ex.scale_image(base, s, size)[0][None].contiguous(memory_format=torch.channels_last) for s in ex.scales]
    global_only = [ex.scale_image(base, s, size)[0][None].contiguous(memory_format=torch.channels_last)
                   for s in ex._global_only_scales]

    @torch.inference_mode()
    def run() -> None:
        for x, with_global in zip(levels, ex._global_levels, strict=True):
            ex.model.extract_with_global(x) if with_global else ex.model.extract(x)
        for x in global_only:
            ex.model.global_descriptor(ex.model.features(x))
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
    p.add_argument("--skip_amp", action="store_true", help="leave out section 3 (precision)")
    p.add_argument("--seed_checkout", type=Path,
                   help="a checkout of nashory/DeLF-pytorch: section 6 times its extraction beside ours")
    p.add_argument("--rss_images", type=int, default=200)
    p.add_argument("--rss_size", type=int, default=128, help="longest side of the RSS-run images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="throughput device (default: cuda when present)")
    p.add_argument("--images", type=int, help="throughput images (default 300 on CUDA, 6 on CPU)")
    p.add_argument("--workers", type=int, help="decoding processes (default: the extractor's)")
    p.add_argument("--only_throughput", action="store_true", help="run section 4 only")
    p.add_argument("--only_layouts", action="store_true", help="run section 5 only")
    p.add_argument("--only_precision", action="store_true", help="run sections 3, 6 (with --seed_checkout) and 7")
    args = p.parse_args()
    print(machine_report())
    flags = cpu_flags()
    print(f"CPU bf16 flags: {', '.join(sorted(BF16_CPU_FLAGS & flags)) or 'none'} (of "
          f"{', '.join(sorted(BF16_CPU_FLAGS))}); AMX tiles: {'amx_tile' in flags}; --amp on this CPU: "
          f"{'bf16 weights' if native_bf16() else 'fp32'}")
    only = args.only_throughput or args.only_layouts or args.only_precision
    with limit_threads(args.threads):
        pca = fit_pca(np.random.default_rng(0).standard_normal((4096, 1024)).astype(np.float32))
        if not only:
            run(args, pca)
        if args.only_precision or not (only or args.skip_amp):
            precision(args, pca)
            if args.seed_checkout:
                versus_seed(args)
            products(args)
        if not only or args.only_throughput:
            throughput(args, pca)
        if not only or args.only_layouts:
            layouts(args, pca)


def precision(args: argparse.Namespace, pca: dict[str, np.ndarray]) -> None:
    """Section 3: fp32, bf16 autocast and pure bf16 extraction of the same images, DeLF and DELG."""
    torch.manual_seed(0)
    models = {"DeLF resnet50 layer3, PCA 40": (Delf(10, arch="resnet50", stage="inference").eval(), pca),
              "DELG resnet50 (local: autoencoder 128; global 2048)": (
                  Delg(10, arch="resnet50", classifiers=False).eval(), None)}
    conf = ExtractionConfig(attn_thres=0.0)
    print(f"\n3. precision: fp32 / bf16 autocast (--amp before) / pure bf16 (--amp now), in process, {args.threads} "
          f"threads, attn_thres 0, top_k 1000, 7 scales (medians of {args.repeats} interleaved runs)")
    for label, (model, params) in models.items():
        autocast = DelfExtractor(model, conf, pca=params)
        autocast.conf = replace(autocast.conf, amp=True)  # fp32 weights under bf16 autocast
        ex = {"fp32": DelfExtractor(model, conf, pca=params), "autocast": autocast,
              "bf16": DelfExtractor(model, replace(conf, amp=True), pca=params)}
        if not ex["bf16"].bf16:
            print(f"   {label}: this CPU has no native bf16, so --amp runs fp32 here; bf16 not timed")
            continue
        for width, height in SIZES:
            image = test_image(width, height)
            t = compare({**{name: lambda e=e, image=image: e(image) for name, e in ex.items()},
                         "floor": network_passes(ex["bf16"], image)}, args.repeats)
            ref, out = ex["fp32"](image), {"autocast": ex["autocast"](image), "bf16": ex["bf16"](image)}
            print(f"   {label}, {width}x{height}: fp32 {t['fp32']:.2f} s, autocast {t['autocast']:.2f} s "
                  f"({t['fp32'] / t['autocast']:.2f}x), pure bf16 {t['bf16']:.2f} s ({t['fp32'] / t['bf16']:.2f}x; "
                  f"goal at 1024x768 on AMX: >= 2.8x), bf16 network alone {t['floor']:.2f} s "
                  f"({t['fp32'] / t['floor']:.2f}x; pure bf16 / network {t['bf16'] / t['floor']:.3f})")
            for name, result in out.items():
                common, cos = agreement(ref, result)
                line = (f"      {name} vs fp32: keypoints in common {100 * common:.1f} %, mean descriptor cosine "
                        f"{cos:.5f}, features {len(result['scores'])} / {len(ref['scores'])}")
                if "global_descriptor" in ref:
                    line += f", global cosine {float(ref['global_descriptor'] @ result['global_descriptor']):.6f}"
                print(line)


SEED_DRIVER = """
import sys
sys.path[:0] = [{root!r}, {helper!r}]
import torch
import torchvision.transforms as transforms
from PIL import Image
import delf_helper
from train.delf import Delf_V1
model = Delf_V1(ncls=None, load_from={ckpt!r}, arch='resnet50', stage='inference', target_layer='layer3')
model.eval()
x = transforms.ToTensor()(Image.open({image!r}).convert('RGB'))[None]
out = delf_helper.GetDelfFeatureFromMultiScale(
    x=x, model=model, filename='image', pca_mean=None, pca_vars=None, pca_matrix=None, pca_dims=None,
    rf=291.0, stride=16.0, padding=145.0, top_k=1000, scale_list={scales!r}, iou_thres=0.98,
    attn_thres=0.17, use_pca=False, workers=4)
print('seed features:', len(out['location_np_list']))
"""


def versus_seed(args: argparse.Namespace) -> None:
    """Section 6: whole processes on one 1024x768 JPEG: extractor.py (--amp, then fp32) against the
    seed's extraction (its Delf_V1 and delf_helper.GetDelfFeatureFromMultiScale from
    ``args.seed_checkout``, the settings of its extractor.py: IoU 0.98, threshold 0.17, top 1000,
    no PCA, 4 threads over the scales). Both read one seed-format checkpoint (random weights)."""
    root = args.seed_checkout.resolve()
    if not (root / "train" / "delf.py").is_file() or not (root / "helper" / "delf_helper.py").is_file():
        raise SystemExit(f"error: {root}: not a checkout of nashory/DeLF-pytorch (no train/delf.py or "
                         "helper/delf_helper.py)")
    scales = [0.25, 0.3535, 0.5, 0.7071, 1.0, 1.4142, 2.0]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": "", "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        torch.manual_seed(0)
        model = Delf(10, arch="resnet50", stage="keypoint", attn_batchnorm=False)
        ckpt = tmp_path / "seed_format.pth.tar"
        torch.save({"base": model.base.state_dict(), "attn": model.attn.state_dict(), "pool": {},
                    "logits": model.logits.state_dict(), "epoch": 0}, ckpt)
        (tmp_path / "images" / "x").mkdir(parents=True)  # the seed's ImageFolder layout: root/class/image
        image = tmp_path / "images" / "x" / "image.jpg"
        test_image(1024, 768).save(image, quality=90)
        driver = SEED_DRIVER.format(root=str(root), helper=str(root / "helper"), ckpt=str(ckpt), image=str(image),
                                    scales=scales)
        commands = {"seed": [sys.executable, "-c", driver]}
        for amp in ("true", "false"):
            commands[f"ours --amp {amp}"] = [
                sys.executable, str(PROJECT_ROOT / "extract" / "extractor.py"), "--mode", "delf",
                "--load_from", str(ckpt), "--input_path", str(tmp_path / "images"),
                "--output_path", str(tmp_path / f"amp-{amp}.h5"),
                "--use_pca", "false", "--iou_thres", "0.98", "--attn_thres", "0.17", "--top_k", "1000",
                "--scale_list", *map(str, scales), "--amp", amp, "--overwrite"]
        print(f"\n6. whole processes, one 1024x768 JPEG, resnet50 layer3 (random weights, seed format), "
              f"OMP_NUM_THREADS={args.threads}; the seed from {root}")
        seconds = {}
        for name, command in commands.items():
            start = time.perf_counter()
            result = subprocess.run(command, cwd=root if name == "seed" else PROJECT_ROOT, env=env,
                                    capture_output=True, text=True)
            seconds[name] = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(f"error: {name} failed:\n{result.stderr[-2000:]}")
            print(f"   {name}: {seconds[name]:.1f} s")
        print(f"   seed / ours --amp: {seconds['seed'] / seconds['ours --amp true']:.2f}x (goal on an AMX CPU: >= 8x); "
              f"seed / ours fp32: {seconds['seed'] / seconds['ours --amp false']:.2f}x")


def products(args: argparse.Namespace) -> None:
    """Section 7: the products beside the network, float32 against bf16 (torch, oneDNN), one thread
    for the per-image and per-pair ones (as the pipeline and the matcher run them)."""
    rng = np.random.default_rng(0)
    descriptors = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((1000, 1024), np.float32)), dim=1)
    params = {k: torch.from_numpy(v) for k, v in fit_pca(rng.standard_normal((2048, 1024)).astype(np.float32)).items()}
    half = {k: v.bfloat16() for k, v in params.items()}
    a, b = (rng.random((1000, 41), np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
    sample = torch.from_numpy(rng.standard_normal((100_000, 1024), np.float32))
    print("\n7. products beside the network, float32 vs bf16 (medians)")
    with limit_threads(1):
        t = compare({"pca32": lambda: apply_pca(descriptors, params, 40),
                     "pca16": lambda: apply_pca(descriptors.bfloat16(), half, 40),
                     "match32": lambda: a @ b.T, "match16": lambda: ta @ tb.T}, 50)
    t.update(compare({"cov32": lambda: sample.T @ sample, "cov16": lambda: sample.bfloat16().T @ sample.bfloat16()},
                     max(1, args.repeats // 2)))
    print(f"   PCA projection of 1000 x 1024 descriptors to 40-D: fp32 {t['pca32'] * 1e3:.2f} ms, bf16 "
          f"{t['pca16'] * 1e3:.2f} ms per image")
    print(f"   matcher's distance product, 1000 x 41 by 1000 x 41: numpy fp32 {t['match32'] * 1e3:.2f} ms, torch bf16 "
          f"{t['match16'] * 1e3:.2f} ms per pair")
    print(f"   PCA fit's covariance, 100000 x 1024: fp32 {t['cov32']:.2f} s, bf16 {t['cov16']:.2f} s, once per model")


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


if __name__ == "__main__":
    main()
