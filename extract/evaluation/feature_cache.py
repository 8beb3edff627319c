"""The features of a revisitop dataset, extracted once and cached: <features_dir>/db.h5 (database
images) and query.h5 (queries cropped to their bbx, keypoints in the crop's frame); those of an
extra image set (codebook training images, distractors) in <features root>/<set name>.h5.
revisitop's bbx is in stored-pixel coordinates: the crop comes before the EXIF orientation.
Resumable; a cache made with other parameters is refused unless ``overwrite``. One evaluation at
a time writes a dataset's cache folder (:func:`hold_cache`); an image set's file is locked by the
extraction that writes it."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
from tqdm import tqdm

from extract.evaluation.revisitop import Dataset, EvalError
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.extract_features import (
    Existing,
    LazyExtractor,
    Written,
    default_workers,
    device_failure,
    extract_features,
    feature_attrs,
    feature_writer,
    stopped_by,
    write_failure,
)
from extract.extraction.feature_file import (
    GLOBAL_KEY,
    FeatureFileError,
    feature_names,
    iter_features,
    open_features,
    read_array,
)
from extract.extraction.images import InputError, image_loader, list_images
from extract.extraction.workshare import WorkShare
from train.outputs import OutputInUse, OutputLock, OutputLockUnavailable, OutputWriteError

log = logging.getLogger("delf")


@contextmanager
def hold_cache(output: str | Path, hint: str = "choose another --features_dir", share: WorkShare | None = None
               ) -> Iterator[None]:
    """This run alone writes ``output`` (a feature cache folder and what an evaluation keeps
    there, or a codebook file) inside the block, its lock held by process 0 (``share``: under
    torchrun); another run holding it raises EvalError saying so (and ``hint``) on every process,
    before anything is touched."""
    held: list[OutputLock] = []

    def lock() -> None:
        try:
            held.append(OutputLock(output, hint=hint))
        except (OutputInUse, OutputLockUnavailable) as e:
            raise EvalError(str(e)) from None

    (share or WorkShare()).from_main(lock)
    try:
        yield
    finally:
        for taken in held:
            taken.release()


def cache_features(ds: Dataset, ex: DelfExtractor | LazyExtractor, checkpoint: str | Path, pca_file: str | Path | None,
                   features_dir: str | Path, overwrite: bool = False, workers: int | None = None) -> tuple[Path, Path]:
    """(db.h5, query.h5) in ``features_dir`` holding every image of ``ds``; images already there
    are skipped. ``checkpoint`` and ``pca_file`` are what ``ex`` was built from (recorded). The
    images are decoded (queries cropped, all shrunk to ``max_image_size``) by ``workers``
    background processes, as extraction's (default: its :func:`default_workers`), while ``ex``
    extracts. An unusable image, or a failed device, stops it with the reason (EvalError,
    DeviceFailure); the images written until then stay."""
    workers = default_workers(ex.device) if workers is None else workers
    attrs = feature_attrs(ex, checkpoint, pca_file, ds.images, save_attention=False, workers=workers)
    jobs = {"db": ([(n, ds.path(n)) for n in ds.imlist], None),
            "query": ([(n, ds.path(n)) for n in ds.qimlist],
                      {n: np.asarray(g["bbx"]).ravel().tolist() for n, g in zip(ds.qimlist, ds.gnd, strict=True)})}
    paths = {}
    for part, (items, crops) in jobs.items():
        paths[part] = Path(features_dir) / f"{part}.h5"
        part_attrs = {**attrs, "crop_to_bbx": part == "query"}
        try:
            with feature_writer(paths[part], part_attrs, overwrite) as writer:
                todo = [item for item in items if not writer.has(item[0])]
        except FeatureFileError as e:
            raise EvalError(f"{e}\n(here: --overwrite extracts again, --features_dir picks another "
                            "cache folder)") from None
        # the decoding workers start before the file is opened again, so that they never inherit it
        loader = image_loader(todo, workers, ex.conf.max_image_size, pin_memory=ex.device.type == "cuda", crops=crops)
        decoded = iter(loader) if todo else iter(())
        written = 0
        try:
            with feature_writer(paths[part], part_attrs) as writer:
                for name, path, image, size, reason in tqdm(decoded, total=len(todo), desc=f"{ds.name} {part} features",
                                                            unit="img", dynamic_ncols=True):
                    if image is None or size is None:
                        raise EvalError(f"{path}: {reason}")
                    try:
                        feats = ex(image, original_size=(int(size[0]), int(size[1])))
                    except RuntimeError as e:
                        failure = device_failure(path, e)
                        if failure is None:
                            raise
                        raise stopped_by(failure, paths[part], written) from e
                    writer.write(name, feats)
                    written += 1
        except OSError as e:
            raise EvalError(write_failure(paths[part], e, written)) from None
    return paths["db"], paths["query"]


def read_all(path: Path, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Features of ``names``, in that order, from one pass over the file."""
    wanted = set(names)
    found = {name: f for name, f in iter_features(path) if name in wanted}
    missing = [n for n in names if n not in found]
    if missing:
        raise EvalError(f"{path}: no features for {len(missing)} images (e.g. {missing[0]!r})")
    return [found[n] for n in names]


def set_name(source: str | Path) -> str:
    """A file-name-safe name for an image folder or list: its last two path parts, e.g.
    ``rparis6k_jpg`` for data/rparis6k/jpg (revisitop's folders are all called jpg)."""
    parts = Path(source).resolve().parts[-2:]
    return "_".join("".join(c if c.isalnum() or c in "-." else "-" for c in p) for p in parts)


def image_set_file(source: str | Path, features_root: str | Path) -> Path:
    """The feature file of an image folder or list: <features_root>/<set_name>.h5."""
    return Path(features_root) / f"{set_name(source)}.h5"


def cache_image_set(source: str | Path, features_root: str | Path, ex: DelfExtractor | LazyExtractor,
                    checkpoint: str | Path, pca_path: str | Path | None, overwrite: bool = False,
                    existing: Existing | None = None, written: Written | None = None, share: WorkShare | None = None
                    ) -> tuple[Path, list[str]]:
    """Features of every image of a folder (recursive) or image list -- the codebook's training
    images, distractors -- in :func:`image_set_file`, extracted by ``ex`` (made from
    ``checkpoint`` and ``pca_path``: recorded), resumable; returns the file and its image names
    in list order (unusable images are skipped and logged). ``existing``, ``written``: as
    :func:`extract.extraction.extract_features`'s, as is ``share`` (under torchrun: the images
    shared among the processes)."""
    output = image_set_file(source, features_root)
    try:
        report = extract_features(ex.conf, checkpoint, source, output, pca_path=pca_path, overwrite=overwrite,
                                  device=ex.device, extractor=ex, existing=existing, written=written, share=share)
    except OutputInUse as e:  # another evaluation extracts the same image set: nothing else to choose
        raise EvalError(f"{e.output}: in use by another process ({e.holder}); wait for it") from None
    except (InputError, OutputWriteError) as e:
        raise EvalError(str(e)) from None
    except FeatureFileError as e:
        raise EvalError(f"{e}\n(here: --overwrite extracts again)") from None
    for path, reason in report.skipped:
        log.warning("%s: skipped (%s)", path, reason)
    # read once process 0 has merged the processes' parts into the file
    stored = set((share or WorkShare()).from_main(lambda: feature_names(output)))
    return output, [name for name, _ in list_images(source) if name in stored]


class FeatureStore:
    """Database features spread over feature files: image i is the i-th (file, name) of
    ``parts``; files stay open for reading until :meth:`close` (a context manager)."""

    def __init__(self, parts: Sequence[tuple[Path, Sequence[str]]]) -> None:
        self._files = [open_features(path) for path, _ in parts]
        self._entries = [(k, name) for k, (_, names) in enumerate(parts) for name in names]
        for (path, names), f in zip(parts, self._files, strict=True):
            missing = [n for n in names if not isinstance(f.get(n), h5py.Group)]
            if missing:
                self.close()
                raise EvalError(f"{path}: no features for {len(missing)} images (e.g. {missing[0]!r})")

    def __len__(self) -> int:
        return len(self._entries)

    def features(self, i: int) -> dict[str, np.ndarray]:
        """Keypoints and descriptors of database image ``i``."""
        k, name = self._entries[i]
        group = self._files[k][name]
        return {key: read_array(group, key) for key in ("keypoints", "descriptors")}

    def global_descriptors(self) -> Iterator[np.ndarray | None]:
        """The global descriptor of image 0, 1, ... (None where the file has none: DeLF features)."""
        for k, name in self._entries:
            group = self._files[k][name]
            yield group[GLOBAL_KEY][()] if GLOBAL_KEY in group else None

    def arrays(self, key: str) -> Iterator[np.ndarray]:
        """Array ``key`` (e.g. "keypoints") of image 0, 1, ... read one image at a time."""
        for k, name in self._entries:
            yield read_array(self._files[k][name], key)

    def descriptors(self) -> Iterator[np.ndarray]:
        """The (n, D) float32 descriptors of image 0, 1, ... read one image at a time."""
        return self.arrays("descriptors")

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
