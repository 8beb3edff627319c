"""Extraction over many images into a feature file: :func:`extract_features` from an image folder
or list. Callable from Python; extractor.py is the CLI.

    from extract.config import ExtractionConfig
    from extract.extraction.extract_features import extract_features
    report = extract_features(ExtractionConfig(), "fix.pth.tar", "images/", "features.h5", pca_path="pca.h5")

The feature file's layout is described in extract/extraction/feature_file.py; its root attributes
are the :class:`~extract.config.ExtractionConfig` in effect (``dataclasses.asdict``) plus the model
and run facts of :func:`feature_attrs`. Rerunning resumes: images already in the file are skipped.
Under torchrun, pass ``share=WorkShare.join(runtime)``: the images are split between processes
and the result equals a single-process run.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from extract.config import ExtractionConfig, part_path
from extract.errors import OptionError, UserError
from extract.extraction.delf_extractor import DelfExtractor, conf_in_effect, too_small
from extract.extraction.feature_file import (
    FeatureFileError,
    FeatureWriter,
    feature_names,
    first_line,
    iter_features,
    plain_attr,
    storable_attr,
)
from extract.extraction.images import Decoded, image_loader, list_images
from extract.extraction.report import Report
from extract.extraction.workshare import WorkShare
from train.dataloader import default_workers as loader_workers
from train.outputs import OutputLock, OutputWriteError, file_sha256

log = logging.getLogger("delf")


# called with an image's name and its arrays as written to a feature file
Written = Callable[[str, dict[str, np.ndarray]], None]


# called with the names of the images already in a feature file
Existing = Callable[[list[str]], None]


# Stored in the feature file's attributes but free to change when a run is resumed.
INFORMATIONAL = ("checkpoint", "pca_parameters_path", "device", "workers", "batch_size")


# Compared attributes that older feature files lack, and the value such a file had: descriptors
# were whitened whenever the PCA was applied; the device type was part of the informational
# "device"; CUDA ran with PyTorch's default TF32 convolutions; the pyramid and boxes had this
# project's conventions; descriptors were float32.
LEGACY = {"descriptor_dtype": lambda stored: "float32",
          "use_whitening": lambda stored: bool(stored.get("use_pca", False)),
          "resize": lambda stored: "antialias",
          "boxes": lambda stored: "half_pixel",
          "device_type": lambda stored: str(stored.get("device", "cpu")).split(":")[0],
          "tf32": lambda stored: str(stored.get("device", "cpu")).startswith("cuda")}


# Words of the errors that belong to the device, not to one image: CUDA's errors are sticky (every
# later call fails alike), so skipping the image would skip every remaining one.
DEVICE_FAILURES = ("CUDA error", "device-side assert", "illegal memory access", "illegal instruction",
                   "misaligned address", "unspecified launch failure", "CUBLAS_STATUS", "CUDNN_STATUS",
                   "cuDNN error", "NCCL error", "ECC error")


class DeviceFailure(UserError):
    """The device failed during extraction (a CUDA error): the run stops; the feature file keeps
    the images written before, and a rerun resumes."""


def device_failure(path: Path, error: BaseException) -> DeviceFailure | None:
    """A DeviceFailure naming image ``path`` when ``error`` is the device's (torch.AcceleratorError,
    or a RuntimeError whose message says one of :data:`DEVICE_FAILURES`), else None: the error is
    the image's (a bad file, out of memory for a huge image), and skipping it is safe."""
    if not isinstance(error, RuntimeError) or isinstance(error, torch.OutOfMemoryError):
        return None
    text = str(error)
    if "out of memory" in text or not any(words in text for words in DEVICE_FAILURES):
        return None
    return DeviceFailure(f"{path}: the device failed ({type(error).__name__}: {text.splitlines()[0]})")


def stopped_by(failure: DeviceFailure, target: Path, written: int) -> DeviceFailure:
    """``failure`` in one line with what the feature file ``target`` keeps after ``written``
    images of this run, and how to go on."""
    return DeviceFailure(f"{failure}; the run stopped (CUDA cannot go on in this process) after {written} images "
                         f"written in this run{kept_images(target)}: rerun the same command to resume")


def tf32_enabled(device: torch.device) -> bool:
    """Whether convolutions or matrix products on ``device`` may round to TF32 (CUDA only)."""
    return device.type == "cuda" and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def feature_writer(path: str | Path, attrs: dict[str, Any], overwrite: bool = False) -> FeatureWriter:
    """The feature file ``path`` opened for appending with the extraction's resume rules
    (:data:`INFORMATIONAL` attributes not compared, :data:`LEGACY` values for older files)."""
    return FeatureWriter(path, attrs, overwrite=overwrite, informational=INFORMATIONAL, legacy=LEGACY)


def load_extractor(conf: ExtractionConfig, checkpoint: str | Path, pca_file: str | Path | None = None,
                   device: str | torch.device = "cpu") -> DelfExtractor:
    """The extractor of ``checkpoint`` (+ the PCA file when ``conf.use_pca``) on ``device``."""
    return DelfExtractor.from_checkpoint(checkpoint, pca_file, conf, device=device)


# what every feature file records of the network (DELG files: global_dim and global_scales too)
NETWORK_ATTRS = frozenset({"descriptor_dim", "arch", "target_layer", "receptive_field"})


class LazyExtractor:
    """:func:`load_extractor`'s extractor, built at its first use, so that a run whose features are
    all in their files never loads the network. What a feature file records of the network
    (:meth:`DelfExtractor.network_attrs`) is read from ``recorded``, the root attributes of a
    feature file, when it was made from the same checkpoint and PCA file (sha256) with the same
    settings; a call, or anything else of the extractor, builds it."""

    def __init__(self, conf: ExtractionConfig, checkpoint: str | Path, pca_file: str | Path | None = None,
                 device: str | torch.device = "cpu", recorded: dict[str, Any] | None = None) -> None:
        self._args = (conf, checkpoint, pca_file, device)
        self._built: DelfExtractor | None = None
        self._recorded: dict[str, Any] | None = None
        self.conf = conf_in_effect(conf, conf.use_pca and pca_file is not None)
        self.device = torch.device(device)
        if recorded is not None and NETWORK_ATTRS <= set(recorded):
            now = {"checkpoint_sha256": file_sha256(checkpoint),
                   "pca_sha256": file_sha256(pca_file) if self.conf.use_pca and pca_file is not None else "",
                   **{k: plain_attr(storable_attr(v)) for k, v in asdict(self.conf).items()}}
            if all(k in recorded and recorded[k] == v for k, v in now.items()):
                self._recorded = recorded

    def extractor(self) -> DelfExtractor:
        """The extractor, built on the first call."""
        if self._built is None:
            self._built = load_extractor(*self._args)
        return self._built

    @property
    def scales(self) -> tuple[float, ...]:
        return self.conf.scale_list

    @property
    def checkpoint_sha256(self) -> str:
        return self._recorded["checkpoint_sha256"] if self._recorded is not None else self.extractor().checkpoint_sha256

    def network_attrs(self) -> dict[str, Any]:
        """:meth:`DelfExtractor.network_attrs`, recorded or of the extractor."""
        if self._recorded is None:
            return self.extractor().network_attrs()
        return {k: v for k, v in self._recorded.items() if k in NETWORK_ATTRS | {"global_dim", "global_scales"}}

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.extractor()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.extractor(), name)


def feature_attrs(ex: DelfExtractor | LazyExtractor, checkpoint: str | Path, pca_file: str | Path | None,
                  input_path: str | Path, save_attention: bool = False, workers: int = 1) -> dict[str, Any]:
    """Root attributes of a feature file: the extraction config in effect, the network
    (:meth:`DelfExtractor.network_attrs`), the sha256 sums of the checkpoint and PCA file, the
    device type and TF32 state (features of a CPU and a GPU differ in the last bits, enough to
    change a selection at the threshold: a file holds one kind), and (informational) where the run
    took them from."""
    pca_file = Path(pca_file) if ex.conf.use_pca and pca_file is not None else None
    return {**ex.network_attrs(),
        **asdict(ex.conf), "save_attention": save_attention,
        "checkpoint_sha256": ex.checkpoint_sha256, "pca_sha256": file_sha256(pca_file) if pca_file else "",
        "input_path": str(Path(input_path).resolve()), "checkpoint": str(Path(checkpoint).resolve()),
        "device_type": ex.device.type, "tf32": tf32_enabled(ex.device),
        "pca_parameters_path": str(pca_file.resolve()) if pca_file else "", "device": str(ex.device),
        "workers": workers, "batch_size": 1,
    }


def default_workers(device: str | torch.device) -> int:
    """Decoding processes when none are asked for: 1 on the CPU (the network needs the cores);
    on a GPU this process's share of the CPUs (train.dataloader's count, among torchrun's
    LOCAL_WORLD_SIZE processes per node) less one for itself, at most 8, so that decoding and
    shrinking keep the GPU busy."""
    if torch.device(device).type != "cuda":
        return 1
    return max(1, min(8, loader_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1))) - 1))


def extract_all(ex: DelfExtractor, items: list[tuple[str, Path]], workers: int, report: Report,
                show_progress: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, features) of each usable image; the others go into ``report``. ``workers``
    processes decode and shrink the images (into pinned memory for a GPU).

    The decoding workers are forked here, at the call: open the output file afterwards, so that
    they never inherit it (orphaned workers of a killed run would keep it locked)."""
    loader = image_loader(items, workers, ex.conf.max_image_size, pin_memory=ex.device.type == "cuda")
    decoded = iter(loader) if items else iter(())
    return _stream(ex, decoded, len(items), report, show_progress)


def _stream(ex: DelfExtractor, decoded: Iterator[Decoded], total: int, report: Report,
            show_progress: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    with tqdm(total=total, unit="img", disable=not show_progress, dynamic_ncols=True) as bar:
        for name, path, image, size, reason in decoded:
            feats = _extract_one(ex, path, image, size, reason, report)
            if feats is not None:
                yield name, feats
            bar.update()


def _extract_one(ex: DelfExtractor, path: Path, image: torch.Tensor | None, size: tuple[int, int] | None,
                 reason: str | None, report: Report) -> dict[str, Any] | None:
    if image is None or size is None:
        report.skip(path, str(reason))
        return None
    size = (int(size[0]), int(size[1]))
    try:
        feats = ex(image, original_size=size)
    except Exception as e:  # one image must never cost the others; a failed device stops the run
        failure = device_failure(path, e)
        if failure is not None:
            raise failure from e
        log.warning("%s: extraction failed: %s", path, e)
        report.skip(path, f"extraction failed ({type(e).__name__}: {e})")
        return None
    small = too_small(*size, ex.conf.max_image_size)
    if small:
        report.skip(path, f"{small}; zero features")
    else:
        report.processed += 1
    return feats


def extract_features(conf: ExtractionConfig, checkpoint: str | Path, input_path: str | Path,
                     output_path: str | Path, *, pca_path: str | Path | None = None, save_attention: bool = False,
                     workers: int | None = None, overwrite: bool = False, device: str | torch.device = "cpu",
                     share: WorkShare | None = None, extractor: DelfExtractor | LazyExtractor | None = None,
                     existing: Existing | None = None, written: Written | None = None
                     ) -> Report:
    """Extract every image of ``input_path`` (a folder, searched recursively, or a text file of
    paths) into the feature file ``output_path``; images already there are skipped. PCA when
    ``conf.use_pca`` and ``pca_path`` is given. An existing file made with other parameters is
    refused unless ``overwrite``; so is one made on another device type or TF32 setting. ``workers``
    decoding processes (default :func:`default_workers`). Returns the report (``report.output`` is
    the file). ``extractor``: the extractor of ``conf``, ``checkpoint`` and ``pca_path`` on ``device``
    when the caller has it already (evaluate.py's :class:`LazyExtractor` serves all its image sets and
    loads the model only when one of them has an image to extract).
    ``existing(names)``: called, the output locked and its attributes checked, with the names of
    this process's images already in the file (list order) before the others are extracted;
    ``written(name, arrays)``: after each image this process writes, with its arrays as a reader
    gets them back from the file (evaluate.py aggregates distractors into its index so)."""
    share = share or WorkShare()
    workers = default_workers(device) if workers is None else workers
    output = Path(output_path)
    items = list_images(input_path)
    ex = extractor or load_extractor(conf, checkpoint, pca_path, device)
    if save_attention and 1.0 not in ex.scales:
        raise OptionError("--save_attention stores the attention map at scale 1.0: add 1.0 to --scale_list")
    attrs = feature_attrs(ex, checkpoint, pca_path, input_path, save_attention, workers)
    with claim_output(output, share):
        done: set[str] = set()
        target = output
        if share.distributed:  # each process fills a part file; process 0 merges them at the end
            done = set(share.from_main(lambda: _done(output, attrs, items, overwrite)))
            target = part_path(output, share.rank, share.size)
        mine = share.share([item for item in items if item[0] not in done])
        with feature_writer(target, attrs, overwrite) as writer:
            stored = {name for name, _ in mine if writer.has(name)}
        todo = [item for item in mine if item[0] not in stored]
        if existing is not None:
            existing([name for name, _ in mine if name in stored])
        report = Report(output, existing=len(mine) - len(todo) + (len(done) if share.is_main else 0))
        failure = _write_all(target, attrs, extract_all(ex, todo, workers, report, share.is_main), save_attention,
                             written)
        results = share.gather((report, failure))  # every process learns of a failure, none waits forever
        failures = [f for _, f in results if f]
        if failures:
            raise failures[0]
        if share.distributed and share.is_main:
            _merge_parts(output, attrs, share.size)
    return Report.total([r for r, _ in results])


def os_error_reason(error: OSError) -> str:
    """The OS's words for an I/O error (h5py's own text is many lines)."""
    return os.strerror(error.errno) if error.errno else first_line(error)


@contextmanager
def claim_output(output: Path, share: WorkShare) -> Iterator[None]:
    """Process 0 holds ``output``'s lock (train.outputs.OutputLock) for the block; when another
    run holds it, every process raises OutputInUse before anything is touched."""
    held: list[OutputLock] = []
    share.from_main(lambda: held.append(OutputLock(output, hint="choose another --output_path")))
    try:
        yield
    finally:
        for lock in held:
            lock.release()


def _write_all(target: Path, attrs: dict[str, Any], stream: Iterator[tuple[str, dict[str, Any]]],
               save_attention: bool, written: Written | None = None) -> OutputWriteError | DeviceFailure | None:
    """Write the stream into ``target`` (each image then passed to ``written``); None, or the error
    that stopped it, in one line: an I/O error, or a device failure (what the file keeps, how to
    go on)."""
    count = 0
    try:
        with feature_writer(target, attrs) as writer:
            for name, feats in stream:
                stored = writer.write(name, feats, save_attention=save_attention)
                count += 1
                if written is not None:
                    written(name, stored)
    except OSError as e:
        return OutputWriteError(write_failure(target, e, count))
    except DeviceFailure as e:
        return stopped_by(e, target, count)
    return None


def write_failure(path: Path, error: OSError, written: int) -> str:
    """One line for an I/O error while writing the feature file ``path`` after ``written`` images
    of this run: what failed, what the file keeps, and that a rerun resumes."""
    if isinstance(error, FileNotFoundError) or not path.exists():
        return (f"{path}: removed while it was written (its folder deleted?); the images written in this run "
                f"({written}) went with it: rerun the same command to extract them again")
    return (f"{path}: writing failed ({os_error_reason(error)}) after {written} images written in this run"
            f"{kept_images(path)}: rerun the same command to resume")


def kept_images(path: Path) -> str:
    """"; the file keeps N complete images", or "" when the file cannot be read."""
    try:
        return f"; the file keeps {len(feature_names(path))} complete images"
    except FeatureFileError:
        return ""


def _done(output: Path, attrs: dict[str, Any], items: list[tuple[str, Path]], overwrite: bool) -> list[str]:
    with feature_writer(output, attrs, overwrite) as writer:
        return [name for name, _ in items if writer.has(name)]


def _merge_parts(output: Path, attrs: dict[str, Any], world_size: int) -> None:
    with feature_writer(output, attrs) as writer:
        for rank in range(world_size):
            part = part_path(output, rank, world_size)
            for name, feats in iter_features(part):
                writer.write(name, feats, save_attention="attention" in feats)
            part.unlink()
