"""Train DeLF, stage by stage (see docs/training.md):

    python train/main.py --stage finetune --finetune_train_path T --finetune_val_path V ...
    python train/main.py --stage keypoint --load_from FINETUNE.pth.tar --keypoint_train_path T ...
    python train/main.py --config configs/delf_finetune.toml --finetune_train_path T ...   # a named setup

Also ``cd train && python main.py ...`` and ``torchrun --nproc_per_node=N train/main.py ...``.
Outputs: ``<repo>/<expr>/<stage>/{ckpt,log}``, ``<repo>`` being ``$DELF_REPO_DIR`` (default
``<project root>/repo``). From Python, use :func:`train.run.train` with a :class:`TrainConfig`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import TrainConfig, parse_args

__all__ = ["TrainConfig", "main"]


def main(argv: list[str] | None = None) -> Path:
    """Parse ``argv`` (default: sys.argv[1:]) and train one stage; returns its output folder.
    User errors exit with a one-line ``error: ...`` message (SystemExit), never a traceback; a run
    refused at its start leaves no folder behind."""
    cfg = parse_args(argv)
    # the flags first, then torch: --help and a bad flag need no torch
    from train.checkpoint import CheckpointError
    from train.dataloader import DataError
    from train.delf import PretrainedUnavailable
    from train.outputs import OutputWriteError, removed_if_failed
    from train.run import RunRefused, train
    from train.runtime import setup_logging, setup_runtime, teardown_runtime
    from train.solver import TrainingDiverged

    setup_logging(int(os.environ.get("RANK", 0)) == 0)
    runtime = setup_runtime(cfg.device, cfg.gpu_id)
    out_dir = cfg.output_dir()
    try:
        with removed_if_failed(out_dir):
            return train(cfg, runtime)
    except (RunRefused, DataError, CheckpointError, PretrainedUnavailable, OutputWriteError) as e:
        raise SystemExit(f"error: {e}") from None
    except TrainingDiverged as e:
        last = out_dir / "ckpt" / "last.pth.tar"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
        raise SystemExit(f"error: {e} ({kept}); try a lower --lr") from None
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; continue with --resume (checkpoints in {out_dir / 'ckpt'})") from None
    finally:
        teardown_runtime()


if __name__ == "__main__":
    main()
