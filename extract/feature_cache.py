"""The features of a revisitop dataset, extracted once and cached: <features_dir>/db.h5 (database
images) and query.h5 (queries cropped to their bbx, keypoints in the crop's frame). Resumable;
a cache made with other parameters is refused unless ``overwrite``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from extract.extraction import INFORMATIONAL, feature_attrs
from extract.features import FeatureFileError, FeatureWriter, iter_features
from extract.images import BadImage, load_image
from extract.pipeline import DelfExtractor
from extract.revisitop import Dataset, EvalError


def cache_features(ds: Dataset, ex: DelfExtractor, checkpoint: str | Path, pca_file: str | Path | None,
                   features_dir: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """(db.h5, query.h5) in ``features_dir`` holding every image of ``ds``; images already there
    are skipped. ``checkpoint`` and ``pca_file`` are what ``ex`` was built from (recorded)."""
    attrs = feature_attrs(ex, checkpoint, pca_file, ds.images, save_attention=False, workers=0)
    jobs = {"db": [(n, ds.path(n), None) for n in ds.imlist],
            "query": [(n, ds.path(n), g["bbx"]) for n, g in zip(ds.qimlist, ds.gnd, strict=True)]}
    paths = {}
    for part, items in jobs.items():
        paths[part] = Path(features_dir) / f"{part}.h5"
        try:
            writer = FeatureWriter(paths[part], {**attrs, "crop_to_bbx": part == "query"},
                                   overwrite=overwrite, informational=INFORMATIONAL)
        except FeatureFileError as e:
            raise EvalError(f"{e}\n(here: --overwrite extracts again, --features_dir picks another "
                            "cache folder)") from None
        with writer:
            todo = [item for item in items if not writer.has(item[0])]
            for name, path, bbx in tqdm(todo, desc=f"{ds.name} {part} features", unit="img",
                                        dynamic_ncols=True):
                try:
                    image = load_image(path)
                except BadImage as e:
                    raise EvalError(f"{path}: {e}") from None
                if bbx is not None:
                    image = image.crop(tuple(float(v) for v in np.asarray(bbx).ravel()))
                writer.write(name, ex(image))
    return paths["db"], paths["query"]


def read_all(path: Path, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Features of ``names``, in that order, from one pass over the file."""
    wanted = set(names)
    found = {name: f for name, f in iter_features(path) if name in wanted}
    missing = [n for n in names if n not in found]
    if missing:
        raise EvalError(f"{path}: no features for {len(missing)} images (e.g. {missing[0]!r})")
    return [found[n] for n in names]
