"""Fitting the PCA of DeLF descriptors over an image folder or list into a PCA file
(:func:`fit_pca_file`; extractor.py --mode pca is the CLI). The PCA itself and its file are
extract/extraction/pca.py."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from extract.config import ExtractionConfig, PcaFitConfig, part_path
from extract.errors import OptionError
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.extract_features import (
    claim_output,
    default_workers,
    extract_all,
    load_extractor,
    os_error_reason,
)
from extract.extraction.images import list_images
from extract.extraction.pca import PcaError, Reservoir, merge_samples, save_pca
from extract.extraction.pca import fit_pca as fit_pca_params
from extract.extraction.report import Report
from extract.extraction.workshare import WorkShare
from train.outputs import OutputWriteError

log = logging.getLogger("delf")


def fit_pca_file(conf: ExtractionConfig, checkpoint: str | Path, input_path: str | Path, output_path: str | Path,
                 fit: PcaFitConfig | None = None, *, workers: int | None = None, overwrite: bool = False,
                 device: str | torch.device = "cpu", share: WorkShare | None = None) -> Report:
    """Fit the PCA of the descriptors of the images of ``input_path`` (without PCA, a uniform
    random sample of at most ``fit.pca_max_features``) and write the PCA file ``output_path``
    (layout in extract/extraction/pca.py), tied to the checkpoint by its sha256. An existing file is refused
    unless ``overwrite``. Returns the report (``report.output`` is the file)."""
    share, fit = share or WorkShare(), fit or PcaFitConfig()
    workers = default_workers(device) if workers is None else workers
    max_features, seed = fit.pca_max_features, fit.seed
    output = Path(output_path)
    if max_features < 1:
        raise OptionError("--pca_max_features must be >= 1")
    with claim_output(output, share):
        if share.from_main(lambda: output.exists() and not overwrite):
            raise PcaError(f"{output} exists: pass --overwrite to refit it (then extract the features again), "
                           "or choose another --output_path")
        items = list_images(input_path)
        ex = load_extractor(conf, checkpoint, None, device)
        reservoir = Reservoir(max_features, seed=seed + share.rank)
        report = Report(output)
        for _, feats in extract_all(ex, share.share(items), workers, report, share.is_main):
            reservoir.add(feats["descriptors"])
        try:
            _save_pca_file(output, ex, reservoir, report, checkpoint, input_path, fit, share)
        except OSError as e:
            raise OutputWriteError(f"{output}: writing the PCA file failed ({os_error_reason(e)}); nothing was "
                                   "replaced: rerun the same command to fit it again") from None
    return report


def _save_pca_file(output: Path, ex: DelfExtractor, reservoir: Reservoir, report: Report, checkpoint: str | Path,
                   input_path: str | Path, fit: PcaFitConfig, share: WorkShare) -> None:
    """Merge the processes' samples (torchrun), fit and write the PCA file atomically (process 0)."""
    sample = reservoir.sample
    if share.distributed:
        part = part_path(output, share.rank, share.size, ".npy")
        try:
            np.save(part, sample)
            failure = ""
        except OSError as e:
            part.unlink(missing_ok=True)
            failure = os_error_reason(e)
        results = share.gather((reservoir.seen, report, failure))
        parts = [part_path(output, r, share.size, ".npy") for r in range(share.size)]
        if any(f for _, _, f in results):
            if share.is_main:
                for p in parts:
                    p.unlink(missing_ok=True)
            raise OutputWriteError(f"{output}: writing the descriptor sample failed ("
                                   f"{next(f for _, _, f in results if f)}); nothing was replaced: "
                                   "rerun the same command to fit it again")
        merged = Report.total([r for _, r, _ in results])
        report.processed, report.existing, report.skipped = merged.processed, merged.existing, merged.skipped
        if share.is_main:
            sample = merge_samples([np.load(p, mmap_mode="r") for p in parts], [n for n, _, _ in results],
                                   fit.pca_max_features, fit.seed)
            for p in parts:
                p.unlink()
    if share.is_main:
        extraction = {k: v for k, v in asdict(ex.conf).items()
                      if k not in ("use_pca", "pca_dims", "use_whitening", "descriptor_dtype")}
        save_pca(output, fit_pca_params(sample), {
            "checkpoint_sha256": ex.checkpoint_sha256, "num_features": len(sample), "num_images": report.processed,
            "checkpoint": str(Path(checkpoint).resolve()), "input_path": str(Path(input_path).resolve()),
            **extraction, "scale_list": np.asarray(ex.scales), **asdict(fit),
            "arch": ex.model.arch, "target_layer": ex.model.target_layer})
        log.info("PCA of %d descriptors (%d-d) from %d images written to %s", len(sample), sample.shape[1],
                 report.processed, output)
