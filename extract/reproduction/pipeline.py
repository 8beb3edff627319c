"""A published row from nothing: :func:`reproduce` downloads what is missing, converts the official
release when its model is missing, evaluates as the setup's config file says, and compares with the
published figures.

    from extract.config import DownloadConfig
    from extract.reproduction.pipeline import reproduce
    from extract.reproduction.setups import SETUPS
    result = reproduce(SETUPS["delf_v1_roxf_asmk_sp"], "R", "parameters", DownloadConfig())
    print(result.rows())   # (protocol, published, this run, difference), mAP in percent

Every step resumes: the downloads (extract/downloads/: the manifest), the conversion (a model of
the same release in repo/<load_expr> is used as it is), and the evaluation's feature cache, ASMK*
codebook and stored index (extract/evaluation/). A second run downloads, converts and extracts
nothing; it ranks and re-ranks the queries again (minutes), so its table is that of the files in
place.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from extract.config import DownloadConfig, EvalConfig, MatchConfig, dataset_features_dir
from extract.downloads.fetch import fetch_item, item_folder
from extract.downloads.manifest import MANIFEST_NAME
from extract.downloads.registry import ITEMS
from extract.errors import UserError
from extract.evaluation.evaluate_dataset import Scores, evaluate_dataset
from extract.evaluation.revisitop import DATASETS, EvalError, check_images, load_dataset
from extract.flags import add_extraction_args, add_match_args, extraction_from_args
from extract.official.convert import convert_release, output_paths
from extract.reproduction.setups import Setup, shown
from train.checkpoint import load_file
from train.cli import ConfigFileError, add_config_args, config_from_args, read_config_file
from train.runtime import repo_dir

log = logging.getLogger("delf")


class ReproduceError(UserError):
    """A setup that cannot run as asked (its config, its model); the message says what to do."""


@dataclass
class Reproduction:
    """What one setup gave: this run's scores (final and initial ranking, revisitop's tables), the
    resolved settings (as evaluate.py's --output records them), the reproduce command and the
    equivalent evaluate.py command."""

    setup: Setup
    final: Scores
    initial: Scores
    settings: dict[str, Any]
    command: str
    evaluate_command: str

    def rows(self) -> list[tuple[str, float, float, float]]:
        """(protocol, published mAP, this run's mAP, difference) per published protocol."""
        return [(protocol, published, self.final[protocol]["mAP"], self.final[protocol]["mAP"] - published)
                for protocol, published in self.setup.published.mAP.items()]


def evaluation_args(config: Path, device: str = "auto") -> argparse.Namespace:
    """The flags of a setup's config file (extract/evaluate.py's dataset, model, extraction,
    matching and evaluation flags), as evaluate.py parses them; the file's keys count as given
    (they override what a converted checkpoint records)."""
    parser = argparse.ArgumentParser(prog=shown(config), add_help=False)
    parser.add_argument("--dataset", choices=DATASETS)
    add_config_args(parser, EvalConfig)
    add_match_args(parser)
    add_extraction_args(parser)
    try:
        values = read_config_file(parser, config)
    except ConfigFileError as e:
        raise ReproduceError(str(e)) from None
    if "dataset" not in values:
        raise ReproduceError(f"{config}: names no dataset (dataset = \"roxford5k\" or \"rparis6k\")")
    parser.set_defaults(**values)
    args = parser.parse_args(["--device", device])
    args.given_flags = frozenset(values)
    return args


def ensure_dataset(name: str, data_root: Path, conf: DownloadConfig) -> None:
    """<data_root>/<name> complete: downloaded (what its manifest lacks), or complete without a
    manifest (downloaded by hand: used as it is)."""
    folder = item_folder(ITEMS[name], data_root, "")
    if not (folder / MANIFEST_NAME).exists():
        try:
            check_images(load_dataset(data_root, name))
            log.info("%s: complete in %s (no manifest: used as it is)", name, folder)
            return
        except EvalError:
            pass
    fetch_item(ITEMS[name], folder, conf)


def ensure_model(setup: Setup, expr: str, parameters_dir: Path, conf: DownloadConfig) -> None:
    """repo/<expr> holds the setup's release, converted: downloaded and converted when missing."""
    if setup.release is None:
        return  # the experiment's own model: extraction_from_args names what is missing
    checkpoint, pca = output_paths(expr)
    if checkpoint.is_file() and pca.is_file():
        source = (load_file(checkpoint).get("source") or {}).get("release")
        if source == setup.release:
            log.info("%s: %s converted already in %s", setup.name, setup.release, checkpoint.parent)
            return
        raise ReproduceError(f"{checkpoint}: holds {source or 'a model of this project'}, not {setup.release}: move "
                             f"{repo_dir() / expr} away (or evaluate it with extract/evaluate.py), then rerun")
    folder = item_folder(ITEMS[setup.release], "", parameters_dir)
    fetch_item(ITEMS[setup.release], folder, conf)
    if importlib.util.find_spec("tensorflow") is None:
        raise ReproduceError(f"converting {folder} needs TensorFlow, which is not installed here: make install-convert "
                             "(or pip install -r requirements-convert.txt), then rerun")
    log.info("%s: converting %s into %s", setup.name, folder, repo_dir() / expr)
    convert_release(folder, expr, setup.release)


def reproduce(setup: Setup, data_root: str | Path, parameters_dir: str | Path, conf: DownloadConfig | None = None,
              device: str = "auto", command: str = "") -> Reproduction:
    """``setup`` end to end (see the module docstring): datasets under ``data_root``, the release
    under ``parameters_dir``, features, codebook and index under repo/<load_expr>/."""
    conf = conf or DownloadConfig()
    data_root, parameters_dir = Path(data_root), Path(parameters_dir)
    args = evaluation_args(setup.config, device)
    for name in dict.fromkeys([args.dataset, *([setup.codebook] if setup.codebook else [])]):
        ensure_dataset(name, data_root, conf)
    ensure_model(setup, args.load_expr, parameters_dir, conf)
    extraction, checkpoint, pca_file, torch_device = extraction_from_args(args)
    evaluation, matching = config_from_args(EvalConfig, args), config_from_args(MatchConfig, args)
    codebook_images = data_root / setup.codebook / "jpg" if setup.codebook else None
    ds = load_dataset(data_root, args.dataset)
    features_dir = dataset_features_dir(args.load_expr, ds.name)
    log.info("%s: evaluating %s on %s", setup.name, checkpoint, ds.name)
    result = evaluate_dataset(ds, checkpoint, features_dir, pca_path=pca_file, extraction=extraction,
                              matching=matching, conf=evaluation, codebook_images=codebook_images,
                              codebook_dir=repo_dir() / args.load_expr / "asmk", device=torch_device)
    settings = {"dataset": ds.name, "data_root": data_root, "checkpoint": checkpoint, "pca": pca_file,
                "features_dir": features_dir, "codebook_images": codebook_images, "distractors": None,
                "evaluation": asdict(evaluation), "matching": asdict(matching), "extraction": asdict(extraction)}
    words = ["python", "extract/evaluate.py", "--config", shown(setup.config), "--data_root", str(data_root)]
    words += ["--codebook_images", str(codebook_images)] if codebook_images else []
    words += ["--device", device] if device != "auto" else []
    return Reproduction(setup, result.final, result.initial, settings,
                        command or f"python extract/reproduce.py {setup.name}", shlex.join(words))
