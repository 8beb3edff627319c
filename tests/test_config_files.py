"""--config FILE (TOML) for train/main.py, extract/extractor.py, extract/evaluate.py and
extract/matcher.py: values reach the typed configs and what the scripts record, flags win, bad files
are one-line errors, and every published setup in configs/ parses for its script."""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from extract import evaluate, extractor, flags, matcher
from extract.config import EvalConfig, ExtractionConfig, MatchConfig
from extract.extraction.feature_file import file_attrs
from extract.make_demo import run as demo_run
from tests.test_evaluate import small_gnd
from tests.utils import save_keypoint_checkpoint
from train import main as trainer
from train.checkpoint import atomic_save, checkpoint_dict, load_file
from train.cli import config_from_args, parse_args_given
from train.config import TrainConfig, build_parser, parse_args
from train.delf import Delf
from train.runtime import PROJECT_ROOT, repo_dir

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.toml"))
PARSERS = {"train/main.py": build_parser, "extract/extractor.py": extractor.build_parser,
           "extract/evaluate.py": evaluate.build_parser, "extract/matcher.py": matcher.build_parser}


def toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- values, precedence, recording ---------------------------------------------------------------
def test_file_values_reach_the_train_config(tmp_path: Path) -> None:
    """Each key sets its flag as the command line would: validators run (ADAM -> adam), the seed's
    alias names work, required paths may come from the file."""
    f = toml(tmp_path / "t.toml", 'finetune_train_path = "t"\nfinetune_val_path = "v"\nlr = 0.1\noptim = "ADAM"\n'
                                  "use_random_gamma_scaling = false\nmanualSeed = 3\nfinetune_epoch = 2\n")
    assert parse_args(["--config", str(f)]) == TrainConfig(
        finetune_train_path="t", finetune_val_path="v", lr=0.1, optim="adam", use_random_gamma_rescale=False,
        manualSeed=3, finetune_epoch=2)


def test_flags_override_the_file_and_both_count_as_given(tmp_path: Path) -> None:
    f = toml(tmp_path / "e.toml", 'input_path = "imgs"\nscale_list = [0.5, 1]\ntop_k = 20\nuse_pca = false\n'
                                  'resize = "tf1"\n')
    args = parse_args_given(extractor.build_parser(), ["--config", str(f), "--top_k", "30", "--scale_list", "2"])
    conf = config_from_args(ExtractionConfig, args)
    assert conf == ExtractionConfig(scale_list=(2.0,), top_k=30, use_pca=False, resize="tf1")
    assert args.input_path == "imgs"
    assert {"input_path", "scale_list", "top_k", "use_pca", "resize"} <= args.given_flags
    assert not {"attn_thres", "iou_thres", "pca_dims", "boxes"} & args.given_flags
    # --config=FILE, as any flag
    assert parse_args_given(extractor.build_parser(), [f"--config={f}"]).top_k == 20
    # a required flag the file does not set is still required
    with pytest.raises(SystemExit):
        parse_args_given(extractor.build_parser(), ["--config", str(toml(tmp_path / "none.toml", "top_k = 5\n"))])


def test_evaluate_takes_its_flags_from_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = toml(tmp_path / "ev.toml", 'dataset = "rparis6k"\ndata_root = "R"\nmethod = "vote"\nknn = 5\n'
                                   "max_distance = 0.9\nmutual = true\npca_dims = 128\n")
    args = parse_args_given(evaluate.build_parser(), ["--config", str(f), "--knn", "7"])
    assert (args.dataset, args.data_root) == ("rparis6k", Path("R"))
    assert config_from_args(EvalConfig, args) == EvalConfig(method="vote", knn=7)
    assert config_from_args(MatchConfig, args) == MatchConfig(max_distance=0.9, mutual=True)
    assert config_from_args(ExtractionConfig, args).pca_dims == 128 and "pca_dims" in args.given_flags

    # scoring a ranking, everything from the file: the JSON records the setting
    root = small_gnd(tmp_path)
    np.save(tmp_path / "ranks.npy", np.tile(np.arange(6)[:, None], (1, 2)))
    out = tmp_path / "res.json"
    f = toml(tmp_path / "ranks.toml", f'dataset = "roxford5k"\ndata_root = "{root}"\n'
                                      f'ranks = "{tmp_path / "ranks.npy"}"\noutput = "{out}"\n')
    assert evaluate.main(["--config", str(f)]) == 0
    assert json.loads(out.read_text())["config"] == {"dataset": "roxford5k", "data_root": str(root),
                                                     "ranks": str(tmp_path / "ranks.npy")}


def test_extraction_records_the_file_over_a_checkpoints_settings(tmp_path: Path, images: Path, one_thread: None
                                                                 ) -> None:
    """A converted official model's recorded settings apply to the flags not given; a value from
    the file counts as given (it beats the recording), a flag beats the file. The feature file's
    attributes are what was used."""
    torch.manual_seed(0)
    ckpt = tmp_path / "official.pth.tar"
    recorded = {"attn_thres": 100.0, "top_k": 50, "resize": "tf1", "boxes": "official", "iou_thres": 1.0}
    atomic_save(checkpoint_dict(Delf(3, arch="resnet18", stage="keypoint"), extraction=recorded), ckpt)
    f = toml(tmp_path / "x.toml", f'load_from = "{ckpt}"\nmode = "delf"\nuse_pca = false\nattn_thres = 0.0\n'
                                  f'top_k = 20\nscale_list = [0.5, 1.0]\nworkers = 0\ninput_path = "{images}"\n')
    out = tmp_path / "f.h5"
    assert extractor.main(["--config", str(f), "--top_k", "30", "--output_path", str(out)]) == 0
    attrs = file_attrs(out)
    assert (attrs["attn_thres"], attrs["top_k"], attrs["scale_list"]) == (0.0, 30, [0.5, 1.0])
    assert (attrs["resize"], attrs["boxes"], attrs["iou_thres"]) == ("tf1", "official", 1.0)
    assert attrs["use_pca"] is False


def test_training_records_the_file_in_config_json(image_data: tuple[Path, Path], tmp_path: Path, expr: str,
                                                  one_thread: None) -> None:
    f = toml(tmp_path / "ft.toml",
             f'stage = "finetune"\nexpr = "{expr}"\nfinetune_train_path = "{image_data[0]}"\n'
             f'finetune_val_path = "{image_data[1]}"\narch = "resnet18"\npretrained = "none"\n'
             "finetune_sample_size = 72\nfinetune_crop_size = 64\ntrain_batch_size = 4\nval_batch_size = 4\n"
             "workers = 0\nmanualSeed = 7\nfinetune_epoch = 1\nlr = 0.02\n")
    out = trainer.main(["--config", str(f), "--lr", "0.03", "--weight_decay", "0"])
    assert out == repo_dir() / expr / "finetune"
    config = json.loads((out / "log" / "config.json").read_text())
    assert (config["arch"], config["finetune_sample_size"], config["manualSeed"]) == ("resnet18", 72, 7)
    assert (config["lr"], config["weight_decay"]) == (0.03, 0.0)
    assert load_file(out / "ckpt" / "last.pth.tar")["config"] == config


# --- bad files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ('top_k = "many"', "top_k = \"many\": invalid int value: 'many'"),
    ("top_k = 1.5", "top_k = 1.5: invalid int value: '1.5'"),
    ('use_pca = "yes"', 'use_pca = "yes": expected true or false'),
    ("attn_thres = true", "attn_thres = true: expected a string or a number, got a boolean"),
    ("scale_list = 0.5", "scale_list = 0.5: expected an array (the flag takes several values)"),
    ("scale_list = []", "scale_list = []: expected at least one value"),
    ("iou_thres = [0.5]", "iou_thres = [0.5]: expected one value, got an array"),
    ('resize = "bicubic"', "resize = \"bicubic\": invalid choice: 'bicubic' (choose from antialias, tf1)"),
    ("mode = { a = 1 }", "expected a value, got a table"),
    ("attn_thresh = 0.5", "unknown key 'attn_thresh': no such flag; did you mean 'attn_thres'?"),
    ("zzz = 1", "unknown key 'zzz': no such flag (keys are the flag names without --, see --help)"),
    ("config = 'other.toml'", "unknown key 'config'"),
    ("top_k = = 3", "not a valid TOML file (Invalid value (at line 1, column 9))"),
])
def test_bad_extractor_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, text: str,
                                        message: str) -> None:
    f = toml(tmp_path / "bad.toml", f'input_path = "imgs"\n{text}\n' if "TOML" not in message else text)
    assert extractor.main(["--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and len(err.splitlines()) == 1
    assert err.startswith(f"error: {f}: ") and message in err


@pytest.mark.parametrize("text, message", [
    ("lr = -1", "lr = -1: expected a number > 0, got -1"),
    ('device = "gpu"', "device = \"gpu\": expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("use_random_gamma_scaling = true\nuse_random_gamma_rescale = false",
     "'use_random_gamma_scaling' and 'use_random_gamma_rescale' both set --use_random_gamma_rescale"),
    ("", "no such file"),
])
def test_bad_train_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    if text:
        toml(f, text + "\n")
    with pytest.raises(SystemExit) as exit_:
        trainer.main(["--config", str(f), "--finetune_train_path", "t", "--finetune_val_path", "v"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {f}: {message}\n"


def test_bad_evaluate_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = toml(tmp_path / "bad.toml", 'dataset = "roxford5k"\ndata_root = "R"\nrerank = "all"\n')
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--config", str(f)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {f}: rerank = \"all\": invalid int value: 'all'\n"


# --- the published setups --------------------------------------------------------------------------
def documented_command(path: Path) -> tuple[str, list[str]]:
    """The command in a config file's header comment (``# python <script> --config <file> ...``),
    its <placeholders> filled in: (script, arguments)."""
    lines = [line[2:] for line in path.read_text().splitlines() if line.startswith("# python ")]
    assert len(lines) == 1, f"{path.name}: expected one '# python <script> --config ...' line"
    words = shlex.split(re.sub(r"<(\w+)>", r"/data/\1", lines[0]))
    assert words[0] == "python" and words[2:4] == ["--config", f"configs/{path.name}"], lines[0]
    return words[1], [words[2], str(path), *words[4:]]


def test_there_are_the_published_setups() -> None:
    assert {p.name for p in CONFIGS} >= {"delf_finetune.toml", "delf_keypoint.toml", "delg_gldv2.toml",
                                         "extract_delf_gld.toml", "roxf_delf_asmk_sp.toml", "rpar_delf_asmk_sp.toml",
                                         "match_demo.toml"}


def test_match_demo_is_the_demos_verification() -> None:
    """configs/match_demo.toml gives the matcher the MatchConfig `make demo` counts inliers with."""
    path = PROJECT_ROOT / "configs" / "match_demo.toml"
    args = parse_args_given(matcher.build_parser(), ["--config", str(path), "a.jpg", "b.jpg"])
    assert config_from_args(MatchConfig, args) == demo_run.match_config(demo_run.PRESETS["full"]) != MatchConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_published_setup_parses_for_its_script(path: Path) -> None:
    """The command a file documents parses, and every key of the file reaches the parsed flags
    (train: the checked TrainConfig) as given."""
    script, argv = documented_command(path)
    parser = PARSERS[script]()
    args = parse_args_given(parser, argv)
    values = tomllib.loads(path.read_text())
    assert values
    dests = {opt[2:]: a.dest for a in parser._actions for opt in a.option_strings}
    assert {dests[k] for k in values} <= args.given_flags
    for key, value in values.items():
        got = getattr(args, dests[key])
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    if script == "train/main.py":
        cfg = parse_args(argv)  # the trainer's own checks pass
        assert cfg.problem() is None
        assert cfg == config_from_args(TrainConfig, args)
    if script == "extract/evaluate.py":  # the published ASMK*+SP setup, codebook from the other dataset
        conf = config_from_args(EvalConfig, args)
        assert (conf.method, conf.codebook_size, conf.rerank) == ("asmk", 65536, 100)
        assert config_from_args(ExtractionConfig, args).pca_dims == 128
        other = {"roxford5k": "rparis6k", "rparis6k": "roxford5k"}[args.dataset]
        assert args.codebook_images.parts[-2:] == (other, "jpg")


def test_official_extraction_setup_leaves_the_recorded_settings(tmp_path: Path) -> None:
    """configs/extract_delf_gld.toml names the model only: every extraction setting comes from the
    converted checkpoint's recording."""
    _, argv = documented_command(PROJECT_ROOT / "configs" / "extract_delf_gld.toml")
    args = parse_args_given(extractor.build_parser(), argv)
    assert args.load_expr == "delf_gld" and args.mode == "delf"
    ckpt = save_keypoint_checkpoint(tmp_path / "fix.pth.tar")
    recorded = {"attn_thres": 100.0, "resize": "tf1", "pca_dims": 128}
    atomic_save({**load_file(ckpt), "extraction": recorded}, ckpt)
    args.load_from, args.device = str(ckpt), "cpu"
    conf, *_ = flags.extraction_from_args(args)
    assert (conf.attn_thres, conf.resize, conf.pca_dims) == (100.0, "tf1", 128)
