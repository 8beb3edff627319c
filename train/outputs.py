"""Writing outputs safely, for train/ and extract/ alike: atomic replacement (:func:`atomic_path`,
the folder synced after the rename: :func:`fsync_folder`), file identity (:func:`file_sha256`), and
one writer per output (:class:`OutputLock`).

One writer per output: an exclusive OS lock (``fcntl.flock``) held for a whole run. The lock lives
in a small side file ``<output>.lock`` beside the output (file or folder) that records the holder's
pid and start time. The kernel releases the lock when its holder exits, however it exits (SIGKILL
included), so a stale side file never blocks the next run; the file itself is left in place,
except by a command that failed (:func:`removed_if_failed`): it removes the side file it made, while
holding its lock (a process that opened the file meanwhile finds, once it holds the lock, that the
file is no longer there, and locks the new one).
Forked children (DataLoader workers) close their copy of the lock file at once, so that workers
orphaned by a killed holder never keep its lock alive. A filesystem that gives no ``flock`` (some
network and FUSE mounts) is refused in one line (:class:`OutputLockUnavailable`).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

_HELD: weakref.WeakSet[OutputLock] = weakref.WeakSet()


def _close_in_child() -> None:
    """After fork, in the child: close the inherited lock files (the parent keeps its locks)."""
    for lock in list(_HELD):
        if lock._file is not None:
            lock._file.close()
            lock._file = None


os.register_at_fork(after_in_child=_close_in_child)


class OutputInUse(RuntimeError):
    """Another live process holds ``output``; ``holder`` says which ("pid N, since T") and
    ``str(e)`` is the one-line message, ending with ``hint``."""

    def __init__(self, output: Path, holder: str, hint: str) -> None:
        super().__init__(f"{output}: in use by another process ({holder}); wait for it or {hint}")
        self.output, self.holder = output, holder


class OutputWriteError(RuntimeError):
    """Writing an output failed (disk full, I/O error, its folder removed); ``str(e)`` is one
    line: what failed, what is kept (e.g. which checkpoint, how many images), and how to go on."""


class OutputLockUnavailable(OutputWriteError, OSError):
    """The filesystem refused the lock (an ``OSError`` from ``flock`` other than "held": ENOLCK on
    some network mounts, EOPNOTSUPP or EINVAL on some FUSE ones). ``str(e)`` is one line naming
    the lock file; ``errno`` and ``strerror`` are the OS's, so callers that catch OSError read it too."""

    def __init__(self, lock_file: Path, error: OSError) -> None:
        reason = error.strerror or type(error).__name__
        super().__init__(f"{lock_file}: cannot lock it ({reason}): this filesystem gives no flock, so two runs "
                         "could write one output; put the output on a local filesystem")
        self.errno, self.strerror = error.errno, reason

    def __str__(self) -> str:
        return str(self.args[0])


def lock_file_for(output: str | os.PathLike) -> Path:
    """The side file that guards ``output`` (a file or a folder): ``<output>.lock`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".lock")


class OutputLock:
    """Exclusive, non-blocking lock on ``output`` for the life of the object (or ``with`` block).

    ``hint`` ends the refusal message, e.g. "choose another --expr". Raises :class:`OutputInUse`
    at construction when another process holds it, :class:`OutputLockUnavailable` when the
    filesystem gives no lock.
    """

    def __init__(self, output: str | os.PathLike, hint: str = "choose another output") -> None:
        self.output = Path(output)
        self.path = lock_file_for(self.output)
        self._file: IO[str] | None = None
        while self._file is None:  # again when the locked file was removed meanwhile (removed_if_failed)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")  # noqa: SIM115 (held until release)
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder()
                self._file.close()
                self._file = None
                raise OutputInUse(self.output, holder, hint) from None
            except OSError as e:
                self._file.close()
                self._file = None
                raise OutputLockUnavailable(self.path, e) from None
            if not _is_file_at(self._file, self.path):
                self._file.close()
                self._file = None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._file.flush()
        _HELD.add(self)

    def _holder(self) -> str:
        assert self._file is not None
        self._file.seek(0)
        return self._file.read().strip() or "pid unknown"

    def release(self) -> None:
        _HELD.discard(self)
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_file_at(file: IO[str], path: Path) -> bool:
    """Whether the open ``file`` is the one at ``path`` now."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _remove_unheld_lock(path: Path) -> None:
    """Remove lock file ``path`` unless a process holds it (removed while locked: see OutputLock)."""
    try:
        file = open(path)  # noqa: SIM115 (closed below)
    except OSError:
        return
    with file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        if _is_file_at(file, path):
            path.unlink()


@contextmanager
def removed_if_failed(*outputs: str | os.PathLike) -> Iterator[None]:
    """A block that writes ``outputs`` (files or folders); when it raises, what it created that
    holds no work is removed: each output's lock file, if the block made it and no process holds
    it, then the folders the block made that are empty, deepest first. A command that fails at its
    start (a missing input, a refused run) leaves no folder behind; one that fails later keeps what
    it wrote."""
    locks = [lock_file_for(output) for output in outputs if not lock_file_for(output).exists()]
    folders = {folder for output in map(Path, outputs) for folder in (output, *output.parents)
               if not folder.exists()}
    try:
        yield
    except BaseException:
        for lock in locks:
            _remove_unheld_lock(lock)
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            try:
                folder.rmdir()  # only when empty; a file output is no folder: left alone
            except OSError:
                pass
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path in ``path``'s folder to write; synced and renamed over ``path`` when the block
    succeeds (then the folder is synced, so that the rename survives a power loss), removed when it
    fails. Readers see the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Sync ``folder``'s entries (a rename or a new file in it) to disk; a filesystem that cannot
    sync a folder (EINVAL, e.g. some FUSE mounts) is left as it is."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
