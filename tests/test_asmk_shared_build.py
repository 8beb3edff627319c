"""The stored ASMK* index built by several torchrun processes (gloo, CPU): each aggregates its share
into its own part of the forward store, process 0 merges the parts and writes the inverted file,
byte for byte the one-process build's; resumed after a killed process, with as many processes,
another count or one; mismatched parts refused in one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extract.config import AsmkConfig
from extract.retrieval.asmk.codebook import VisualWords
from extract.retrieval.asmk.kernel import represent
from extract.retrieval.asmk.stored_index import (
    AsmkIndexError,
    ForwardStore,
    index_identity,
    part_folder,
    update_index,
)
from tests.test_asmk_stored_index import database, files, reader
from tests.utils import script_env
from train.outputs import OutputLock, lock_file_for

ROOT = Path(__file__).resolve().parents[1]

# one process of a shared build: argv data.npz folder [rank to kill, images it aggregates first]
SHARED = """
import json, os, sys
import numpy as np
from extract.config import AsmkConfig
from extract.extraction.workshare import WorkShare
from extract.retrieval.asmk.codebook import VisualWords
from extract.retrieval.asmk.kernel import represent
from extract.retrieval.asmk.stored_index import update_index
from train.runtime import setup_runtime

share = WorkShare.join(setup_runtime("cpu", backend="gloo"))
data = np.load(sys.argv[1])
keys = [k for k in data.files if k != "centroids"]
killed, after = (int(a) for a in sys.argv[3:5]) if len(sys.argv) > 3 else (-1, 0)

def descriptors(todo):
    for i, k in enumerate(todo):
        if share.rank == killed and i == after:
            os._exit(9)
        yield data[k]

cfg = AsmkConfig(codebook_size=64)
index, order, report = update_index(sys.argv[2], VisualWords(data["centroids"], cfg), cfg, keys, descriptors,
                                    commit_every=2, share=share)
print(json.dumps({"rank": share.rank, "in_order": order == keys, "images": index.num_images,
                  "added": report.added, "reused": report.reused}))
"""


def shared_build(tmp_path: Path, folder: Path, nproc: int, kill: tuple[int, int] | None = None
                 ) -> subprocess.CompletedProcess:
    """The SHARED script under torchrun with ``nproc`` processes (``kill``: (rank, after) exits that
    process before its image ``after``)."""
    script = tmp_path / "shared.py"
    script.write_text(SHARED)
    args = [str(tmp_path / "data.npz"), str(folder), *(map(str, kill) if kill else ())]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*torchrun, str(script), *args], capture_output=True, text=True, timeout=300,
                          env=script_env(str(ROOT)))


def reports(done: subprocess.CompletedProcess) -> list[dict]:
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])


@pytest.fixture
def data(tmp_path: Path) -> tuple[VisualWords, AsmkConfig, dict[str, np.ndarray], Path]:
    """A codebook, 60 images, saved for the scripts; the one-process build in <tmp>/one."""
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(11, images=60)
    np.savez(tmp_path / "data.npz", centroids=centroids, **db)
    words = VisualWords(centroids, cfg)
    update_index(tmp_path / "one", words, cfg, list(db), reader(db))
    return words, cfg, db, tmp_path / "one"


@pytest.mark.slow
def test_two_processes_write_the_one_process_index(tmp_path: Path, data) -> None:
    words, cfg, db, one = data
    runs = reports(shared_build(tmp_path, tmp_path / "two", 2))
    assert [r["rank"] for r in runs] == [0, 1]
    assert all(r == {**r, "in_order": True, "images": len(db), "added": len(db), "reused": 0} for r in runs)
    assert files(tmp_path / "two") == files(one)
    assert (tmp_path / "two" / "forward" / "keys.txt").read_bytes() == (one / "forward" / "keys.txt").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two" / "forward").iterdir()) == sorted(
        p.name for p in (one / "forward").iterdir())   # the parts are gone
    # reused as it is by two processes, and grown by one
    runs = reports(shared_build(tmp_path, tmp_path / "two", 2))
    assert all((r["added"], r["reused"]) == (0, len(db)) for r in runs)
    extra = {**db, "new": db["i03"][::-1]}
    _, order, report = update_index(tmp_path / "two", words, cfg, list(extra), reader(extra))
    assert order == list(extra) and (report.added, report.reused) == (1, len(db))


@pytest.mark.slow
@pytest.mark.parametrize(("rank", "rerun"), [(0, 2), (1, 3), (1, 1)])
def test_a_killed_process_resumes_with_any_count(tmp_path: Path, data, rank: int, rerun: int) -> None:
    """Process ``rank`` of 2 dies (no clean-up) before its 6th image (4 committed) and torchrun
    stops the other: the rerun (as many processes, more, or one) aggregates only what no part
    committed, and writes the same bytes."""
    words, cfg, db, one = data
    folder = tmp_path / "killed"
    done = shared_build(tmp_path, folder, 2, kill=(rank, 5))
    assert done.returncode != 0
    assert not (folder / "inverted").exists()
    killed = ForwardStore(part_folder(folder, rank, 2), index_identity(words, cfg, {}), 5)
    killed.close()
    assert killed.num_images == 4
    if rerun == 1:
        read: list[str] = []
        _, order, report = update_index(folder, words, cfg, list(db), reader(db, read))
        runs = [{"in_order": order == list(db), "added": report.added, "reused": report.reused}]
        assert not set(read) & set(killed.keys)
    else:
        runs = reports(shared_build(tmp_path, folder, rerun))
    assert all(r["in_order"] and r["reused"] >= 4 and r["added"] + r["reused"] == len(db) for r in runs)
    assert files(folder) == files(one)
    assert not (folder / "forward" / "parts").exists()


def test_a_merge_killed_midway_resumes(tmp_path: Path, data, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts left by a killed run of 2 processes (written here as they would be); one process
    merges them, killed after its 7th merged image (6 committed); the rerun merges the rest, each
    image once: the one-process bytes."""
    words, cfg, db, one = data
    folder, keys = tmp_path / "ix", list(db)
    for rank in (0, 1):
        with ForwardStore(part_folder(folder, rank, 2), index_identity(words, cfg, {}), 5) as store:
            for key in keys[rank::2][:10]:
                store.append(key, *represent(words, db[key], cfg.db_assignments, key))
            store.commit()
    append, merged = ForwardStore.append, []

    def killed(self: ForwardStore, key: str, codes: np.ndarray, image_words: np.ndarray) -> None:
        if self.folder == folder / "forward":
            if len(merged) == 7:
                raise KeyboardInterrupt
            merged.append(key)
        append(self, key, codes, image_words)

    with monkeypatch.context() as m:
        m.setattr(ForwardStore, "append", killed)
        with pytest.raises(KeyboardInterrupt):
            update_index(folder, words, cfg, keys, reader(db), commit_every=3)
    assert merged == keys[:7] and (folder / "forward" / "parts").is_dir()
    read: list[str] = []
    _, order, report = update_index(folder, words, cfg, keys, reader(db, read))
    assert order == keys and (report.added, report.reused) == (0, len(keys)) and read == []
    assert files(folder) == files(one) and not (folder / "forward" / "parts").exists()


def test_mismatched_parts_are_refused_in_one_line(tmp_path: Path, data) -> None:
    """A part made from another codebook, an image in two parts: AsmkIndexError naming the file,
    nothing aggregated."""
    words, cfg, db, _ = data
    folder = tmp_path / "ix"
    part = part_folder(folder, 0, 2)
    with ForwardStore(part, {**index_identity(words, cfg, {}), "codebook_size": 32}, 5) as store:
        store.commit()
    with pytest.raises(AsmkIndexError) as e:
        update_index(folder, words, cfg, list(db), reader({}))
    assert str(e.value) == (f"{part / 'manifest.json'}: index made from another codebook or other features "
                            f"(codebook_size: 32 in the index, 64 now): delete {part} to aggregate its images again")
    shutil.rmtree(part)   # as the message says
    for rank in (0, 1):
        with ForwardStore(part_folder(folder, rank, 2), index_identity(words, cfg, {}), 5) as store:
            store.append("i07", np.zeros((1, 5), np.uint8), np.array([3]))
            store.commit()
    second = part_folder(folder, 1, 2)
    with pytest.raises(AsmkIndexError) as e:
        update_index(folder, words, cfg, list(db), reader({}))
    assert str(e.value) == (f"{second / 'keys.txt'}: image 'i07' is also in {part / 'keys.txt'} (an image is stored "
                            f"once); delete {second} to aggregate its images again")


@pytest.mark.slow
def test_a_second_run_is_refused_on_every_process(tmp_path: Path, data) -> None:
    """Another run holding the folder: every process stops with the one-line refusal, nothing is
    written."""
    folder = tmp_path / "held"
    with OutputLock(folder):
        holder = lock_file_for(folder).read_text().strip()
        done = shared_build(tmp_path, folder, 2)
    line = f"AsmkIndexError: {folder}: in use by another process ({holder}); wait for it or choose another --load_expr"
    assert done.returncode != 0
    assert all(f"[rank{r}]: extract.retrieval.asmk.stored_index.{line}" in done.stderr for r in (0, 1))
    assert not folder.exists()
