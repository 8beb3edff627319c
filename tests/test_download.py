"""extract/download.py and extract/downloads/ without the internet: tiny revisitop-layout datasets,
distractor archives and a release, packed as the authors pack them, served by a local HTTP server
(tests/http_server.py) that each test starts and stops; the downloader is pointed at it with
--base_url. Also: a connection cut mid-file, a 404, a wrong hash, a full disk, and reruns that
download nothing."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pooch
import pytest

import extract.downloads.archives as archives_module
from extract.config import DownloadConfig
from extract.download import main
from extract.downloads.archives import member_path, unpack
from extract.downloads.fetch import fetch_item
from extract.downloads.registry import ITEMS, Unpack
from extract.errors import DownloadError
from extract.evaluation.revisitop import check_images, load_dataset
from extract.official.convert import variables_prefix
from tests.http_server import FileServer
from tests.test_evaluate import make_dataset


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_bytes(members: dict[str, bytes], folders: tuple[str, ...] = ()) -> bytes:
    """A .tar.gz of ``members`` (path -> bytes) and folder entries, as tar writes them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class Served:
    """What the fake authors' servers hold (URL path -> bytes, as a mirror lays them out) and the
    datasets the archives were made from (<source>/<dataset>/{jpg/, gnd_<dataset>.pkl})."""

    files: dict[str, bytes]
    source: Path
    archive_of: dict[str, str]  # image file name -> the archive holding it


def revisitop_files(root: Path) -> Served:
    """Tiny ROxford5k and RParis6k (tests.test_evaluate.make_dataset, real photos) packed as the
    authors pack them: Oxford's images flat in oxbuild_images-v1.tgz, Paris's in
    paris/<landmark>/ folders split over paris_1-v1.tgz and paris_2-v1.tgz; the revisitop pickles."""
    make_dataset(root / "ox")
    make_dataset(root / "pa", seed=1)
    paris = root / "pa" / "rparis6k"
    (root / "pa" / "roxford5k").rename(paris)
    for image in (paris / "jpg").iterdir():  # Paris's names: paris_<landmark>_<number>.jpg
        image.rename(image.with_name(f"paris_{image.name}"))
    with open(paris / "gnd_roxford5k.pkl", "rb") as f:
        gnd = pickle.load(f)
    for key in ("imlist", "qimlist"):
        gnd[key] = [f"paris_{n}" for n in gnd[key]]
    (paris / "gnd_rparis6k.pkl").write_bytes(pickle.dumps(gnd))
    (paris / "gnd_roxford5k.pkl").unlink()
    source = root / "source"
    source.mkdir()
    (root / "ox" / "roxford5k").rename(source / "roxford5k")
    (root / "pa" / "rparis6k").rename(source / "rparis6k")
    files, archive_of = {}, {}
    for name in ("roxford5k", "rparis6k"):
        files[f"/{name}/gnd_{name}.pkl"] = (source / name / f"gnd_{name}.pkl").read_bytes()
    oxford = {p.name: p.read_bytes() for p in sorted((source / "roxford5k" / "jpg").iterdir())}
    files["/roxford5k/oxbuild_images-v1.tgz"] = tar_bytes(oxford)
    archive_of.update({n: "oxbuild_images-v1.tgz" for n in oxford})
    paris = sorted((source / "rparis6k" / "jpg").iterdir())
    for part, images in (("paris_1-v1.tgz", paris[: len(paris) // 2]), ("paris_2-v1.tgz", paris[len(paris) // 2:])):
        landmarks = sorted({p.name.split("_")[1] for p in images})
        files[f"/rparis6k/{part}"] = tar_bytes({f"paris/{p.name.split('_')[1]}/{p.name}": p.read_bytes()
                                                for p in images},
                                               folders=("paris", *(f"paris/{lm}" for lm in landmarks)))
        archive_of.update({p.name: part for p in images})
    return Served(files, source, archive_of)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return revisitop_files(tmp_path_factory.mktemp("served"))


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, list[str]]:
    """download.py's main: (status, stdout, its error lines)."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, [line for line in err.splitlines() if line.startswith("error:")]


def folder_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --- unpacking ---------------------------------------------------------------------------------
def test_member_paths() -> None:
    flat, release = Unpack("jpg", flatten=True), Unpack(strip="delf_v1_20171026")
    assert member_path("paris/defense/paris_defense_000000.jpg", flat) == "paris_defense_000000.jpg"
    assert member_path("./all_souls_000000.jpg", flat) == "all_souls_000000.jpg"
    assert member_path("delf_v1_20171026/model/saved_model.pb", release) == "model/saved_model.pb"
    assert member_path("model/saved_model.pb", release) == "model/saved_model.pb"  # no leading folder: as it is
    assert member_path("a/b/c.jpg", Unpack("jpg")) == "a/b/c.jpg"
    for unsafe in ("../escape.jpg", "a/../../escape.jpg", "/etc/passwd", "..", "."):
        assert member_path(unsafe, Unpack("jpg")) is None, unsafe


def test_unpack_writes_regular_files_only_inside_its_folder(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("d/a.jpg", b"alpha"), ("../escape.jpg", b"x"), ("/abs.jpg", b"y"), ("d/e/b.jpg", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("d/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("d/hard.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "d/a.jpg"
        tar.addfile(hard)
    archive = tmp_path / "x.tgz"
    archive.write_bytes(buffer.getvalue())
    members = unpack(archive, tmp_path / "item", Unpack("jpg"), progress=False)
    assert members == {"jpg/d/a.jpg": [5, sha(b"alpha")], "jpg/d/e/b.jpg": [0, sha(b"")]}
    assert folder_files(tmp_path) == ["item/jpg/d/a.jpg", "item/jpg/d/e/b.jpg", "x.tgz"]
    assert (tmp_path / "item" / "jpg" / "d" / "a.jpg").read_bytes() == b"alpha"


def test_a_damaged_archive_is_named(tmp_path: Path) -> None:
    good = tar_bytes({f"{i}.jpg": os.urandom(50_000) for i in range(4)})
    for name, data in (("text.tgz", b"<html>not found</html>"), ("cut.tgz", good[: len(good) // 2])):
        archive = tmp_path / name
        archive.write_bytes(data)
        with pytest.raises(DownloadError, match=rf"{archive}: damaged archive \(.*\); delete it and rerun"):
            unpack(archive, tmp_path / name.split(".")[0], Unpack("jpg"), progress=False)
    assert not [p for p in tmp_path.rglob("*.part")]  # no partial member left


def test_no_member_replaces_the_manifest_or_another(tmp_path: Path) -> None:
    for name, members, unpack_to, message in (
            ("m.tgz", {"r/manifest.json": b"{}"}, Unpack(strip="r"), "member r/manifest.json would overwrite the "
                                                                     "manifest"),
            ("twice.tgz", {"a/x.jpg": b"1", "b/x.jpg": b"2"}, Unpack("jpg", flatten=True),
             f"member b/x.jpg would overwrite {tmp_path / 'item' / 'jpg' / 'x.jpg'} twice")):
        (tmp_path / name).write_bytes(tar_bytes(members))
        with pytest.raises(DownloadError, match=re.escape(f"{tmp_path / name}: {message}; delete the archive")):
            unpack(tmp_path / name, tmp_path / "item", unpack_to, progress=False)
    assert not (tmp_path / "item" / "manifest.json").exists()


def test_a_damaged_manifest_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "roxford5k").mkdir()
    (tmp_path / "roxford5k" / "manifest.json").write_text('{"item": "rparis6k", "files": {}}')
    status, _, errors = run(capsys, "roxford5k", "--data_root", str(tmp_path), "--base_url", "http://127.0.0.1:9")
    assert status == 1 and errors == [
        f"error: {tmp_path / 'roxford5k' / 'manifest.json'}: not a manifest of roxford5k (ValueError: it names "
        "'rparis6k'); delete it (and the files it listed) to download again"]


# --- datasets ----------------------------------------------------------------------------------
def test_datasets_download_into_the_revisitop_layout(served: Served, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Images (Paris's folders flattened) and ground truth where evaluate.py reads them, archives
    deleted, every file recorded; a rerun downloads nothing; a missing image fetches its archive
    again, and so does a damaged one, found with --verify."""
    root = tmp_path / "R"
    with FileServer(served.files) as server:
        argv = ("roxford5k", "rparis6k", "--data_root", str(root), "--base_url", server.url, "--progress", "false")
        status, out, errors = run(capsys, *argv)
        assert status == 0 and errors == []
        assert sorted(server.requests) == sorted(served.files)
        assert f"roxford5k: complete in {root / 'roxford5k'} (2 downloaded, 0 already in place" in out
        for name in ("roxford5k", "rparis6k"):
            folder, source = root / name, served.source / name
            images = sorted(p.name for p in (source / "jpg").iterdir())
            assert folder_files(folder) == sorted([f"gnd_{name}.pkl", "manifest.json",
                                                   *(f"jpg/{n}" for n in images)])
            assert all((folder / "jpg" / n).read_bytes() == (source / "jpg" / n).read_bytes() for n in images)
            check_images(load_dataset(root, name))
            manifest = json.loads((folder / "manifest.json").read_text())
            assert manifest["item"] == name
            assert list(manifest["files"]) == [r.name for r in ITEMS[name].files]
            for remote in ITEMS[name].files:
                body = served.files[f"/{name}/{remote.name}"]
                record = manifest["files"][remote.name]
                assert (record["url"], record["size"], record["sha256"]) == (
                    f"{server.url}/{name}/{remote.name}", len(body), sha(body))
                if remote.unpack is not None:
                    assert record["kept"] is False
                    assert record["members"] == {
                        f"jpg/{n}": [(source / "jpg" / n).stat().st_size, sha((source / "jpg" / n).read_bytes())]
                        for n in images if served.archive_of[n] == remote.name}

        server.requests.clear()
        status, out, _ = run(capsys, *argv)
        assert status == 0 and server.requests == []
        assert "rparis6k: complete in" in out and "(0 downloaded, 3 already in place" in out

        lost = next(n for n, a in served.archive_of.items() if a == "paris_2-v1.tgz")
        (root / "rparis6k" / "jpg" / lost).unlink()
        status, out, _ = run(capsys, *argv)
        assert status == 0 and "(1 downloaded, 2 already in place, 1 fetched again (missing or damaged files)" in out
        assert server.requests == ["/rparis6k/paris_2-v1.tgz"]
        assert (root / "rparis6k" / "jpg" / lost).read_bytes() == (served.source / "rparis6k/jpg" / lost).read_bytes()

        server.requests.clear()
        damaged = root / "roxford5k" / "jpg" / next(n for n, a in served.archive_of.items() if a.startswith("oxbuild"))
        good = damaged.read_bytes()
        damaged.write_bytes(bytes(len(good)))  # the same size: only the hash tells
        assert run(capsys, *argv)[0] == 0 and server.requests == []
        assert run(capsys, *argv, "--verify")[0] == 0
        assert server.requests == ["/roxford5k/oxbuild_images-v1.tgz"]
        assert damaged.read_bytes() == good


def test_kept_archives_unpack_again_without_a_download(served: Served, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "R"
    with FileServer(served.files) as server:
        argv = ("roxford5k", "--data_root", str(root), "--base_url", server.url, "--keep_archives")
        assert run(capsys, *argv)[0] == 0
        archive = root / "roxford5k" / "oxbuild_images-v1.tgz"
        assert archive.read_bytes() == served.files["/roxford5k/oxbuild_images-v1.tgz"]
        assert json.loads((root / "roxford5k" / "manifest.json").read_text())["files"][archive.name]["kept"] is True
        server.requests.clear()
        first = sorted((root / "roxford5k" / "jpg").iterdir())[0]
        first.unlink()
        main(list(argv))
        err = capsys.readouterr().err
        assert server.requests == [] and first.is_file()   # unpacked again from the kept archive
        # the progress bar of the unpacking: files; of a download: bytes, rate and time left
        assert "unpacking oxbuild_images-v1.tgz" in err
        (root / "roxford5k" / "gnd_roxford5k.pkl").unlink()
        main(list(argv))
        err = capsys.readouterr().err
        assert server.requests == ["/roxford5k/gnd_roxford5k.pkl"]
        assert "gnd_roxford5k.pkl: 100%" in err and "B/s]" in err and "<00:00" in err


def test_a_cut_connection_keeps_nothing_and_the_rerun_resumes(served: Served, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "R"
    with FileServer(served.files) as server:
        cut = "/rparis6k/paris_2-v1.tgz"
        server.cut.add(cut)
        argv = ("rparis6k", "--data_root", str(root), "--base_url", server.url, "--progress", "false")
        status, _, errors = run(capsys, *argv, "--retries", "1")
        assert status == 1 and len(errors) == 1
        path = root / "rparis6k" / "paris_2-v1.tgz"
        half = len(served.files[cut]) // 2
        assert errors[0] == (f"error: {server.url}{cut}: download cut off or failed 2 times (last: "
                             f"ChunkedEncodingError: Connection broken: IncompleteRead({half} bytes read, "
                             f"{len(served.files[cut]) - half} more expected)); {path} not written, rerun to try again")
        assert server.requests.count(cut) == 2
        # what was complete is in place and recorded; no partial file anywhere
        assert not path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith("tmp")]
        manifest = json.loads((path.parent / "manifest.json").read_text())
        assert list(manifest["files"]) == ["gnd_rparis6k.pkl", "paris_1-v1.tgz"]
        server.cut.clear()
        server.requests.clear()
        assert run(capsys, *argv)[0] == 0
        assert server.requests == [cut]
        check_images(load_dataset(root, "rparis6k"))


def test_a_404_names_the_url_and_writes_nothing(served: Served, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = {k: v for k, v in served.files.items() if not k.endswith("gnd_roxford5k.pkl")}
    with FileServer(files) as server:
        status, _, errors = run(capsys, "roxford5k", "--data_root", str(tmp_path), "--base_url", server.url)
        path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
        assert status == 1 and errors == [
            f"error: {server.url}/roxford5k/gnd_roxford5k.pkl: HTTP 404 Not Found; {path} not written: check the "
            "address, use a mirror (--base_url or $DELF_DOWNLOAD_URL), or download it by hand"]
        assert server.requests == ["/roxford5k/gnd_roxford5k.pkl"]   # an HTTP error is not retried
        assert folder_files(tmp_path / "roxford5k") == []


def test_a_wrong_hash_is_refused(served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    """Against a hash pinned in the registry, and against the one the first download recorded."""
    item = ITEMS["roxford5k"]
    gnd, images = item.files
    body = served.files["/roxford5k/gnd_roxford5k.pkl"]
    with FileServer(served.files) as server:
        argv = ("roxford5k", "--data_root", str(tmp_path), "--base_url", server.url, "--progress", "false")
        monkeypatch.setitem(ITEMS, "roxford5k", dataclasses.replace(
            item, files=(dataclasses.replace(gnd, sha256="0" * 64), images)))
        path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
        status, _, errors = run(capsys, *argv)
        assert status == 1 and errors == [
            f"error: {server.url}/roxford5k/gnd_roxford5k.pkl: the download's sha256 differs from the published one "
            f"({'0' * 64}): the file was damaged on the way or changed on the server; {path} not written, rerun to "
            "try again"]
        assert folder_files(path.parent) == []
        # the right one pinned: accepted and recorded
        monkeypatch.setitem(ITEMS, "roxford5k", dataclasses.replace(
            item, files=(dataclasses.replace(gnd, sha256=sha(body)), images)))
        assert run(capsys, *argv)[0] == 0
        monkeypatch.undo()
        # the server's file changes: a new download must match the first one's record
        server.files["/roxford5k/gnd_roxford5k.pkl"] = pickle.dumps({"imlist": [], "qimlist": [], "gnd": []})
        path.unlink()
        status, _, errors = run(capsys, *argv)
        manifest = path.parent / "manifest.json"
        assert status == 1 and len(errors) == 1
        assert f"sha256 differs from the one recorded in {manifest} ({sha(body)})" in errors[0]
        assert not path.exists()


def test_a_full_disk_keeps_nothing_partial(served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """While downloading: no file under the name; while unpacking: the archive stays, unrecorded,
    and the rerun unpacks it without downloading."""
    def fill_disk(self: pooch.HTTPDownloader, url: str, output_file: str, pooch_: object) -> None:
        with open(output_file, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    root = tmp_path / "R"
    with FileServer(served.files) as server:
        argv = ("roxford5k", "--data_root", str(root), "--base_url", server.url, "--progress", "false")
        with monkeypatch.context() as m:
            m.setattr(pooch.HTTPDownloader, "__call__", fill_disk)
            status, _, errors = run(capsys, *argv)
        path = root / "roxford5k" / "gnd_roxford5k.pkl"
        assert status == 1 and len(errors) == 1
        assert errors[0].startswith(f"error: {path}: disk full while downloading {server.url}/roxford5k/"
                                    "gnd_roxford5k.pkl (")
        assert errors[0].endswith("GiB free there); free some space or choose another folder, then rerun: what is "
                                  "complete is kept and recorded")
        assert folder_files(root / "roxford5k") == []

        written = []

        def fill_on_third(source: io.BufferedIOBase, dest: Path) -> tuple[int, str]:
            if len(written) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(dest)
            return real_write(source, dest)

        real_write = archives_module._write
        with monkeypatch.context() as m:
            m.setattr(archives_module, "_write", fill_on_third)
            status, _, errors = run(capsys, *argv)
        assert status == 1 and len(errors) == 1 and "disk full while unpacking oxbuild_images-v1.tgz" in errors[0]
        archive = root / "roxford5k" / "oxbuild_images-v1.tgz"
        assert archive.is_file()
        assert list(json.loads((root / "roxford5k" / "manifest.json").read_text())["files"]) == ["gnd_roxford5k.pkl"]
        server.requests.clear()
        assert run(capsys, *argv)[0] == 0
        assert server.requests == [] and not archive.exists()
        check_images(load_dataset(root, "roxford5k"))


def test_another_download_of_the_same_item_is_refused(served: Served, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from train.outputs import OutputLock

    with OutputLock(tmp_path / "roxford5k"):
        status, _, errors = run(capsys, "roxford5k", "--data_root", str(tmp_path), "--base_url", "http://127.0.0.1:9")
    assert status == 1 and len(errors) == 1
    assert f"{tmp_path / 'roxford5k'}: in use by another process (pid {os.getpid()}" in errors[0]


# --- distractors and releases -------------------------------------------------------------------
def test_distractors_resume_archive_by_archive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """revisitop1m: 100 archives whose sub-folders are kept under jpg/, as revisitop1m.txt lists
    them; cut at archive 37, the rerun fetches 37 to 100 only."""
    files: dict[str, bytes] = {}
    listed = []
    for i in range(1, 101):
        members = {f"{i % 7}/{i:03d}{k}.jpg": f"image {i} {k}".encode() for k in "ab"}
        files[f"/revisitop1m/revisitop1m.{i}.tar.gz"] = tar_bytes(members)
        listed += list(members)
    files["/revisitop1m/revisitop1m.txt"] = "\n".join(listed).encode() + b"\n"
    root = tmp_path / "R"
    with FileServer(files) as server:
        server.cut.add("/revisitop1m/revisitop1m.37.tar.gz")
        argv = ("revisitop1m", "--data_root", str(root), "--base_url", server.url, "--progress", "false",
                "--retries", "0")
        status, _, errors = run(capsys, *argv)
        assert status == 1 and len(errors) == 1 and "revisitop1m.37.tar.gz: download cut off" in errors[0]
        folder = root / "revisitop1m"
        done = json.loads((folder / "manifest.json").read_text())["files"]
        assert list(done) == ["revisitop1m.txt", *(f"revisitop1m.{i}.tar.gz" for i in range(1, 37))]
        server.cut.clear()
        server.requests.clear()
        assert run(capsys, *argv)[0] == 0
        assert server.requests == [f"/revisitop1m/revisitop1m.{i}.tar.gz" for i in range(37, 101)]
    assert folder_files(folder) == sorted(["manifest.json", "revisitop1m.txt", *(f"jpg/{n}" for n in listed)])
    assert (folder / "jpg" / "2" / "037a.jpg").read_bytes() == b"image 37 a"


def test_a_release_unpacks_into_its_folder(tmp_path: Path) -> None:
    """The release's own folder becomes <parameters_dir>/<release>: the converter's --source."""
    release = {f"delf_v1_20171026/{name}": os.urandom(100) for name in (
        "model/saved_model.pb", "model/variables/variables.index", "model/variables/variables.data-00000-of-00001",
        "pca/mean.datum", "pca/pca_proj_mat.datum", "pca/pca_vars.datum")}
    files = {"/delf_v1_20171026/delf_v1_20171026.tar.gz": tar_bytes(release, folders=("delf_v1_20171026",))}
    with FileServer(files) as server:
        folder = tmp_path / "parameters" / "delf_v1_20171026"
        done = fetch_item(ITEMS["delf_v1_20171026"], folder, DownloadConfig(base_url=server.url, progress=False))
    assert done.downloaded == ["delf_v1_20171026.tar.gz"] and done.in_place == []
    assert folder_files(folder) == sorted(["manifest.json", *(n.split("/", 1)[1] for n in release)])
    assert variables_prefix(folder) == folder / "model" / "variables" / "variables"
    assert (folder / "pca" / "mean.datum").read_bytes() == release["delf_v1_20171026/pca/mean.datum"]


def test_the_registry_names_the_published_urls() -> None:
    """The URLs revisitop's download.py and the official DELF instructions give, in one place."""
    urls = {item: [r.url for r in ITEMS[item].files] for item in ITEMS}
    assert urls["roxford5k"] == ["http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl",
                                 "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"]
    assert urls["rparis6k"][1:] == ["https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
                                    "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz"]
    assert len(urls["revisitop1m"]) == 101
    assert urls["revisitop1m"][-1] == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.100.tar.gz"
    assert urls["delf_gld_20190411"] == ["http://storage.googleapis.com/delf/delf_gld_20190411.tar.gz"]


def test_the_base_url_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("DELF_DOWNLOAD_URL", "http://mirror.example/delf/")
    assert main(["--list"]) == 0
    assert "  http://mirror.example/delf/rparis6k/paris_2-v1.tgz\n" in capsys.readouterr().out
    assert main(["--list", "--base_url", "http://127.0.0.1:8000"]) == 0
    assert "  http://127.0.0.1:8000/delf_v1_20171026/delf_v1_20171026.tar.gz\n" in capsys.readouterr().out
