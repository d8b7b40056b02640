"""Writes that cannot lose a user's data.

Every output (a recording's zarr store or netCDF file, a table, a figure, a text) is written to a hidden temporary
sibling (``.NAME.probe-tmp-PID-XXXXXX``) and renamed into place only when complete. A store that replaces an
existing one is swapped in with one atomic ``renameat2(RENAME_EXCHANGE)`` where the file system has it, so ``out``
always holds either the old output, whole, or the new one, whole; the old one is deleted only after the new one is
in place. Where the exchange is missing, the old output is first renamed aside (``.NAME.probe-old-…``) and the next
write restores it if a kill came between the two renames.

Each write holds a lock on its output (``.NAME.probe-lock``): a second writer to the same path is refused, and the
writer that holds the lock knows that any temporary sibling it finds is a killed run's, which it removes. A folder or
file that is not a probe output is never replaced unless asked (``force=True``).

``PROBE_WRITE_FAULT=PHASE`` (``written``, ``swapped``, ``removing``) kills the process with SIGKILL at that point of
every replacing write, and ``PROBE_WRITE_EXCHANGE=0`` turns the atomic exchange off: the fault-injection tests.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gzip
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP, OLD, LOCK = ".probe-tmp-", ".probe-old-", ".probe-lock"
FAULT_ENV, EXCHANGE_ENV = "PROBE_WRITE_FAULT", "PROBE_WRITE_EXCHANGE"


class OutputBusy(RuntimeError):
    """Another process is writing the same output."""


def _fault(phase: str) -> None:
    if os.environ.get(FAULT_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _hidden(path: Path, mark: str) -> Path:
    return path.with_name(f".{path.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:6]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- what may be replaced --------------------------------------------------------------------------------------------


def probe_output(path: Path) -> bool:
    """Whether ``path`` holds something probe wrote (a recording or sweep store: root attribute ``probe_version``),
    or nothing at all (an empty folder): the only things a write replaces without ``force``."""
    if path.is_dir():
        entries = [p.name for p in path.iterdir()]
        if not entries:
            return True
        for meta in ("zarr.json", ".zattrs"):
            if meta in entries:
                try:
                    attrs = json.loads((path / meta).read_text())
                except (OSError, ValueError):
                    return False
                attrs = attrs.get("attributes", {}) if meta == "zarr.json" else attrs
                return "probe_version" in attrs
        return False
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "probe_version" in f.attrs
    except (OSError, ValueError):
        return False


def check_out(path: str | Path, suffixes: tuple[str, ...], *, force: bool = False, what: str = "recording") -> Path:
    """An output path that can be written, checked before anything is generated: one of ``suffixes``, not a
    symbolic link, not a file where a folder goes (or the reverse), not something probe did not write (unless
    ``force``), its folder created and writable."""
    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise ValueError(f"the {what} must go to a path ending in {' or '.join(suffixes)}, got {str(path)!r}; "
                         f"e.g. {path.with_suffix(suffixes[0])}")
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}); probe replaces outputs by renaming, "
                         "which would replace the link, not what it points to: give the real path")
    folder_output = path.suffix == ".zarr"
    if path.exists():
        if folder_output and not path.is_dir():
            raise ValueError(f"{path} is a file, and a .zarr {what} is a folder; give another path or move the "
                             "file away")
        if not folder_output and path.is_dir():
            raise ValueError(f"{path} is a folder, and a {path.suffix or 'file'} {what} is a file; give another "
                             "path")
        if not force and path.suffix in (".zarr", ".nc") and not probe_output(path):
            raise FileExistsError(f"{path} exists and is not a probe recording, so probe will not replace it; give "
                                  "another path, or force=True (command line: --force) to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the folder {parent} for {path.name}: {err.strerror}; write "
                      "elsewhere") from err
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent} is not a folder, so {path.name} cannot be written inside it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"the folder {parent} is not writable, so {path.name} cannot be written there; write "
                              "elsewhere")
    return path


# -- locks -----------------------------------------------------------------------------------------------------------


class _Held:
    """A lock being held: :meth:`share` turns an exclusive hold into a shared one, without a moment unheld."""

    def __init__(self, fd: int):
        self.fd = fd

    def share(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_SH)


@contextmanager
def locked(path: str | Path, *, shared: bool = False, what: str | None = None) -> Iterator[_Held]:
    """Hold the lock of ``path`` (a hidden sibling file) for a write: exclusive, or ``shared`` among the processes of
    one job; refuse at once with :class:`OutputBusy` while another process holds it otherwise. The lock goes with
    the process, so a killed writer never leaves it held."""
    path = Path(path)
    lock = path.with_name(f".{path.name}{LOCK}")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputBusy(f"{what or path} is being written by {holder}; wait for it to finish, or write "
                             "elsewhere") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file that its last holder removed while we opened it
            break
        os.close(fd)
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
    try:
        yield _Held(fd)
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last holder removes the file
            lock.unlink(missing_ok=True)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


def _clean_stale(path: Path) -> None:
    """A killed write's leftovers (the lock is held, so no other writer is alive): temporaries are removed, an old
    output renamed aside is put back if the new one never arrived, else removed."""
    for leftover in sorted(path.parent.glob(f".{path.name}{OLD}*")):
        if not os.path.lexists(path):
            os.rename(leftover, path)
        else:
            _remove(leftover)
    for leftover in path.parent.glob(f".{path.name}{TMP}*"):
        _remove(leftover)


def recover(path: str | Path) -> None:
    """Put back an output that a killed write had renamed aside (only where the exchange is missing) before
    anything reads ``path``; nothing is done while a writer holds its lock."""
    path = Path(path)
    if os.path.lexists(path) or not any(path.parent.glob(f".{path.name}{OLD}*")):
        return
    try:
        with locked(path):
            _clean_stale(path)
    except OutputBusy:
        pass


# -- replacing an output ---------------------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where the system or file system cannot."""
    if os.environ.get(EXCHANGE_ENV) == "0":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_file(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _into_place(tmp: Path, path: Path) -> None:
    _fsync_file(tmp)
    _fault("written")
    if not tmp.is_dir() or not os.path.lexists(path):
        os.replace(tmp, path)  # atomic for files; for a new folder nothing is replaced
        return
    if _exchange(tmp, path):  # tmp now holds the old output
        _fault("swapped")
    else:
        old = _hidden(path, OLD)
        os.rename(path, old)
        _fault("swapped")
        os.rename(tmp, path)
        tmp = old
    _remove_slowly(tmp)


def _remove_slowly(folder: Path) -> None:
    """Remove the replaced output (with the fault point half-way, where a kill once cost users their data)."""
    children = sorted(folder.iterdir()) if folder.is_dir() else []
    for i, child in enumerate(children):
        if i == len(children) // 2:
            _fault("removing")
        _remove(child)
    _remove(folder)


@contextmanager
def replacing(path: str | Path, *, suffixes: tuple[str, ...] = (), force: bool = False,
              what: str = "output") -> Iterator[Path]:
    """Write ``path`` through a temporary sibling: yields the temporary path to write; when the block ends without an
    error, the temporary replaces ``path`` in one step; on any error (or Ctrl-C) it is removed and ``path`` is as
    it was. Holds ``path``'s lock throughout (a second writer is refused) and checks ``path`` first
    (:func:`check_out`)."""
    path = check_out(path, suffixes, force=force, what=what)
    with locked(path):
        _clean_stale(path)
        tmp = _hidden(path, TMP)
        try:
            yield tmp
            if not os.path.lexists(tmp):
                raise RuntimeError(f"nothing was written for {path}")
            _into_place(tmp, path)
        finally:
            _remove_settled(tmp)


def _remove_settled(path: Path, settle: float = 0.2, tries: int = 25) -> None:
    """Remove a failed write's temporary until it stays gone: an interrupted zarr write's I/O thread may still be
    writing chunks into it for a moment after the interruption reached the main thread."""
    for _ in range(tries):
        if not os.path.lexists(path):
            return
        _remove(path)
        time.sleep(settle)


def write_text(path: str | Path, text: str) -> Path:
    """A text file, replaced whole or not at all."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(table, path: str | Path, **kwargs) -> Path:
    """A pandas table as CSV, replaced whole or not at all (``kwargs`` go to ``to_csv``); gzip-compressed where
    ``path`` ends in ``.gz`` (with no time stamp inside, so the same table is the same bytes)."""
    path = Path(path)
    kwargs = {"index": False, **kwargs}
    with replacing(path) as tmp:
        if path.suffix == ".gz":  # gzip.compress names no file in its header (the temporary's name would differ)
            Path(tmp).write_bytes(gzip.compress(table.to_csv(**kwargs).encode(), mtime=0))
        else:
            table.to_csv(tmp, **kwargs)
    return path


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """A matplotlib figure, replaced whole or not at all (format from ``path``'s suffix)."""
    path = Path(path)
    with replacing(path) as tmp:
        fig.savefig(tmp, **{"format": path.suffix.lstrip(".") or "png", **kwargs})
    return path
