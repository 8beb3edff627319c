"""One writer per output, locked files reported as in use, I/O errors while writing: extraction,
the PCA file and evaluate's feature caches never lose earlier work."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import pytest
import torch

from extract.config import ExtractionConfig
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.extract_features import extract_features
from extract.extraction.feature_file import FeatureFileError, FeatureWriter, feature_names, read_features
from extract.extractor import main
from tests.utils import assert_same_features, make_image_folder, script_env, wait_for_groups
from train.outputs import OutputInUse, OutputLock
from train.runtime import PROJECT_ROOT

EXTRACTOR = PROJECT_ROOT / "extract" / "extractor.py"
FAST = ["--scale_list", "0.5", "1.0", "--workers", "0", "--use_pca", "false"]
CONF = ExtractionConfig(scale_list=(0.5, 1.0), use_pca=False)
env = partial(script_env, str(PROJECT_ROOT))  # the scripts started here import the project

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, ckpt: Path, images: Path) -> Path:
    """The features of ``images`` from one uninterrupted in-process run."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    extract_features(CONF, ckpt, images, out, workers=0)
    return out


@contextmanager
def held_by_another_process(code: str) -> Iterator[int]:
    """Run ``code`` (which takes something) in another Python process until the block ends; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", code + "\nprint('ready', flush=True)\nsys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def lock_code(path: Path) -> str:
    return f"import sys\nfrom train.outputs import OutputLock\nlock = OutputLock({str(path)!r})"


def one_error_line(err: str) -> str:
    """The one line of stderr besides the progress bar's."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "img/s" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- locks ------------------------------------------------------------------------------------
def test_held_output_is_refused_and_left_alone(tmp_path: Path, ckpt: Path, images: Path, reference: Path, capsys):
    """Feature file, PCA file: another process holds the output -> exit 1 with one line naming
    its pid, and nothing changes (--overwrite included)."""
    out = tmp_path / "f.h5"
    shutil.copy(reference, out)
    before = out.read_bytes()
    with held_by_another_process(lock_code(out)) as pid:
        for extra in ([], ["--overwrite"], ["--attn_thres", "0.5", "--overwrite"]):
            assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out),
                         *FAST, *extra]) == 1
            line = one_error_line(capsys.readouterr().err)
            assert line.startswith(f"error: {out}: in use by another process (pid {pid}, since ")
            assert line.endswith("wait for it or choose another --output_path")
        assert out.read_bytes() == before and not (tmp_path / "f.report.txt").exists()

        pca = tmp_path / "pca.h5"
        with held_by_another_process(lock_code(pca)) as pca_pid:
            assert main(["--load_from", str(ckpt), "--mode", "pca", "--input_path", str(images),
                         "--output_path", str(pca), "--overwrite", *FAST]) == 1
            assert f"{pca}: in use by another process (pid {pca_pid}" in one_error_line(capsys.readouterr().err)
        assert not pca.exists()
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), *FAST]) == 0
    assert "0 images extracted, 4 already there" in capsys.readouterr().out


def test_hdf5_file_open_elsewhere_is_in_use_not_unreadable(tmp_path: Path, reference: Path):
    """A feature file that another process has open (HDF5's own lock, e.g. a notebook or a
    process without our lock) is 'in use'; --overwrite does not remove it. Only a file that really
    is not HDF5 gets the 'delete it or pass --overwrite' advice."""
    out = tmp_path / "f.h5"
    shutil.copy(reference, out)
    with held_by_another_process(f"import sys, h5py\nf = h5py.File({str(out)!r}, 'a')"):
        for overwrite in (False, True):
            with pytest.raises(FeatureFileError, match=r"in use by another process \(HDF5 file lock\); wait for it"):
                FeatureWriter(out, {"a": 1}, overwrite=overwrite)
        with pytest.raises(FeatureFileError, match="in use by another process"):
            read_features(out, "coffee/000.jpg")
        assert out.exists()
    assert len(feature_names(out)) == 4
    (tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(FeatureFileError, match=r"not a readable HDF5 file \(.*\); delete it or pass --overwrite"):
        FeatureWriter(tmp_path / "junk.h5", {"a": 1})


def test_forked_children_do_not_keep_a_killed_holders_lock(tmp_path: Path):
    """A holder that forked (as DataLoader workers are forked) and was SIGKILLed: its orphaned
    child lives on, yet the lock is free at once."""
    code = lock_code(tmp_path / "out") + "\nimport os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n" \
        "    os._exit(0)\nprint(pid, flush=True)\ntime.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(OutputInUse, match=f"pid {proc.pid}"):
            OutputLock(tmp_path / "out")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the orphan is still alive
        OutputLock(tmp_path / "out").release()
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_four_extractors_at_once_equal_a_sequential_run(tmp_path: Path, ckpt: Path, images: Path, reference: Path):
    cmd = [sys.executable, str(EXTRACTOR), "--load_from", str(ckpt), "--input_path", str(images), *FAST]
    procs = [subprocess.Popen(cmd + ["--output_path", str(tmp_path / f"{i}.h5"), "--workers", "1"], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "4 images extracted, 0 already there" in out
    for i in range(4):
        assert_same_features(tmp_path / f"{i}.h5", reference)


@pytest.mark.slow
def test_second_extractor_is_refused_while_the_first_finishes_intact(tmp_path: Path, ckpt: Path, capsys):
    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=8, size=160)
    args = ["--load_from", str(ckpt), "--input_path", str(folder), "--use_pca", "false", "--workers", "0",
            "--scale_list", "0.5", "1.0", "2.0"]
    out = tmp_path / "out.h5"
    first = subprocess.Popen([sys.executable, str(EXTRACTOR), *args, "--output_path", str(out)], env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_groups(out, 1, first)
    assert first.poll() is None, "the first run should still be running"
    for extra in ([], ["--overwrite"]):
        assert main([*args, "--output_path", str(out), *extra]) == 1
        assert f"in use by another process (pid {first.pid}, since " in one_error_line(capsys.readouterr().err)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert "24 images extracted, 0 already there" in stdout
    extract_features(ExtractionConfig(scale_list=(0.5, 1.0, 2.0), use_pca=False), ckpt, folder, tmp_path / "ref.h5",
                     workers=0)
    assert_same_features(out, tmp_path / "ref.h5")


@pytest.mark.slow
def test_sigkilled_holder_with_decoding_workers_does_not_block_the_rerun(tmp_path: Path, ckpt: Path):
    """SIGKILL a run whose decoding workers are alive; rerun at once: not refused, and it resumes."""
    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=8, size=160)
    cmd = [sys.executable, str(EXTRACTOR), "--load_from", str(ckpt), "--input_path", str(folder), "--use_pca",
           "false", "--scale_list", "0.5", "1.0", "2.0", "--output_path", str(tmp_path / "out.h5")]
    proc = subprocess.Popen(cmd + ["--workers", "2"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_groups(tmp_path / "out.h5", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(feature_names(tmp_path / "out.h5"))
    assert 2 <= done < 24
    rerun = subprocess.run(cmd + ["--workers", "0"], env=env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{24 - done} images extracted, {done} already there" in rerun.stdout


# --- I/O errors while writing -------------------------------------------------------------------
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left on device"),
                                         (errno.EIO, "Input/output error")])
def test_write_error_is_one_line_and_the_rerun_resumes(tmp_path: Path, ckpt: Path, images: Path, reference: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys, code: int,
                                                       words: str):
    out = tmp_path / "f.h5"
    real_write = FeatureWriter.write
    calls = []

    def failing_write(self: FeatureWriter, name: str, *a: object, **k: object) -> None:
        calls.append(name)
        if len(calls) == 3:  # as h5py reports a failed write
            raise OSError(code, f"Can't synchronously write data (file write failed: errno = {code}, ...)\nmore")
        real_write(self, name, *a, **k)

    monkeypatch.setattr(FeatureWriter, "write", failing_write)
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), *FAST]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: {out}: writing failed ({words}) after 2 images written in this run; the file keeps "
                    "2 complete images: rerun the same command to resume")
    assert feature_names(out) == feature_names(reference)[:2]
    monkeypatch.setattr(FeatureWriter, "write", real_write)
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), *FAST]) == 0
    assert "2 images extracted, 2 already there" in capsys.readouterr().out
    assert_same_features(out, reference)


def _failing_at_the_second_image(monkeypatch: pytest.MonkeyPatch, error: Exception, after: bool) -> list[int]:
    """DelfExtractor raises ``error`` at its 2nd image (and, with ``after``, at every later one, as
    a sticky CUDA error does); returns the list of its calls."""
    real_call, calls = DelfExtractor.__call__, []

    def call(self: DelfExtractor, *a: object, **k: object) -> dict:
        calls.append(1)
        if len(calls) == 2 or (after and len(calls) > 2):
            raise error
        return real_call(self, *a, **k)

    monkeypatch.setattr(DelfExtractor, "__call__", call)
    return calls


# --- the device fails -------------------------------------------------------------------------
@pytest.mark.parametrize("error", [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                           "asynchronously reported at some other API call"),
    RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")], ids=["illegal-address", "assert", "cudnn"])
def test_device_failure_stops_the_run_in_one_line_and_the_rerun_resumes(
        tmp_path: Path, ckpt: Path, images: Path, reference: Path, monkeypatch: pytest.MonkeyPatch, capsys,
        error: Exception):
    """A CUDA error is sticky (every later image would fail alike): the run stops at the image it
    came with, exit 1 with one line; the file keeps the images before it and the rerun resumes."""
    out = tmp_path / "f.h5"
    calls = _failing_at_the_second_image(monkeypatch, error, after=True)
    args = ["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), *FAST]
    assert main(args) == 1
    second = images / feature_names(reference)[1]
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {second}: the device failed ({type(error).__name__}: {str(error).splitlines()[0]}); the run stopped "
        "(CUDA cannot go on in this process) after 1 images written in this run; the file keeps 1 complete images: "
        "rerun the same command to resume")
    assert len(calls) == 2  # no image tried after it
    assert feature_names(out) == feature_names(reference)[:1]
    monkeypatch.undo()
    assert main(args) == 0
    assert "3 images extracted, 1 already there, 0 skipped" in capsys.readouterr().out
    assert_same_features(out, reference)


def test_an_images_own_failure_skips_only_that_image(tmp_path: Path, ckpt: Path, images: Path, reference: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys):
    """Out of memory for one huge image (or any error of its own) skips it, and the run goes on."""
    _failing_at_the_second_image(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                 after=False)
    out = tmp_path / "f.h5"
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), *FAST]) == 0
    second = images / feature_names(reference)[1]
    assert (f"{second}: extraction failed (OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB)"
            in capsys.readouterr().out)
    assert feature_names(out) == [n for i, n in enumerate(feature_names(reference)) if i != 1]


def test_output_folder_removed_during_the_run(tmp_path: Path, ckpt: Path, images: Path, reference: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys):
    out = tmp_path / "sub" / "f.h5"
    real_write = FeatureWriter.write

    def write_then_remove_folder(self: FeatureWriter, *a: object, **k: object) -> None:
        real_write(self, *a, **k)
        shutil.rmtree(out.parent, ignore_errors=True)

    monkeypatch.setattr(FeatureWriter, "write", write_then_remove_folder)
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), *FAST]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {out}: removed while it was written (its folder deleted?); the images written in this run (1) "
        "went with it: rerun the same command to extract them again")
    monkeypatch.setattr(FeatureWriter, "write", real_write)
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), *FAST]) == 0
    assert_same_features(out, reference)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1200 KiB tmpfs (root only; skipped where mount fails): room for one to three images of
    ``images`` beside the 1 MiB that writes leave free."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_real_full_disk(small_disk: Path, ckpt: Path, images: Path, reference: Path, capsys):
    """The feature file fills a small tmpfs: one line, a readable file with the complete images,
    and after room is made the rerun resumes to the uninterrupted result. The PCA file on a full
    disk: one line, nothing written."""
    out = small_disk / "f.h5"
    args = ["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), *FAST]
    assert main(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {out}: writing failed (No space left on device) after ") and \
        line.endswith("complete images: rerun the same command to resume")
    kept = len(feature_names(out))
    assert 0 < kept < 4 and f"the file keeps {kept} complete images" in line
    pca = small_disk / "pca.h5"
    assert main(["--load_from", str(ckpt), "--mode", "pca", "--input_path", str(images), "--output_path", str(pca),
                 "--scale_list", "0.5", "1.0", "2.0", "--workers", "0", "--attn_thres", "0"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {pca}: writing the PCA file failed (No space left on device")
    assert line.endswith("nothing was replaced: rerun the same command to fit it again")
    assert sorted(p.name for p in small_disk.iterdir()) == ["f.h5"]  # the failed runs' lock files removed

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    assert main(args) == 0
    assert f"{4 - kept} images extracted, {kept} already there" in capsys.readouterr().out
    assert_same_features(out, reference)
