"""Atomic file writes: write to a temporary file beside the target, then rename over it.

An exception (or a full disk) mid-write leaves the previous file intact and no temporary behind.
A process killed mid-write (SIGKILL, a power cut) leaves its temporary, named after its process
id; the next write of the same file removes those of processes no longer running.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; the locks below are then not taken (and say so)
    fcntl = None

#: Whether process ids can be probed with os.kill(pid, 0). On Windows signal 0 is CTRL_C_EVENT,
#: which os.kill sends to the process group: temporaries are never taken for stale there.
_POSIX = os.name == "posix"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # named after the target, not a temporary that never existed
        raise type(err)(err.errno, f"cannot write {path}: {err.strerror}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename
            os.fsync(f.fileno())
        set_default_mode(tmp)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by killed processes (``.<name>.<pid>.<random>.tmp``)."""
    remove_stale(path.parent, f".{path.name}.", r"\.[a-z0-9_]{8}\.tmp")


def remove_stale(folder: Path, prefix: str, rest: str) -> list[Path]:
    """Remove the files and folders in ``folder`` named ``<prefix><pid><rest>`` (``rest`` a regular
    expression: what ``tempfile`` adds) whose process is no longer running, as a killed process
    leaves them; returns those removed. What cannot be removed is left."""
    pattern = re.compile(re.escape(prefix) + r"(\d{1,9})" + rest)
    removed = []
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _running(int(match.group(1))):
            try:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            except OSError:
                continue
            removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if not _POSIX:
        return True  # cannot tell without side effects: leave the file (git and DVC ignore it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's; no process id
        return True
    return True


def lock_exclusive(file: IO, blocking: bool = True) -> str | None:
    """Lock the open ``file`` for this process alone (``flock``; the lock goes when the process ends
    or ``unlock`` is called). Returns None once locked, or why it cannot be (no ``flock`` on this
    platform, or a file system without it, such as Lustre mounted without ``-o flock``), leaving it
    unlocked. Raises BlockingIOError where ``blocking`` is false and another process holds it."""
    if fcntl is None:
        return f"no flock on {sys.platform}"
    try:
        fcntl.flock(file, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError as err:  # BlockingIOError (EWOULDBLOCK) is not among these: raised
        if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        return err.strerror or str(err)
    return None


def unlock(file: IO) -> None:
    """Release what :func:`lock_exclusive` took."""
    if fcntl is not None:
        fcntl.flock(file, fcntl.LOCK_UN)


def set_default_mode(path: str | Path) -> None:
    """Give ``path`` the permissions a plainly created file or folder gets under the process's
    umask (``tempfile`` makes its files and folders readable by their owner alone)."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def _umask() -> int:
    """The process's umask, read where Linux shows it; else set and put back (a moment in which a
    file another thread creates would get mode 0o666)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON (indent 2) atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n"))


def nulls_for_non_finite(data: Any, prefix: str = "") -> tuple[Any, list[str]]:
    """``data`` with every NaN or infinite float (in nested dicts and lists) replaced by None, which
    JSON writes as null, and the dotted keys of those replaced."""
    if isinstance(data, float) and not math.isfinite(data):
        return None, [prefix or "(value)"]
    if isinstance(data, dict):
        pairs = [(k, nulls_for_non_finite(v, f"{prefix}.{k}" if prefix else str(k))) for k, v in data.items()]
        return {k: v for k, (v, _) in pairs}, [key for _, (_, keys) in pairs for key in keys]
    if isinstance(data, (list, tuple)):
        items = [nulls_for_non_finite(v, f"{prefix}[{i}]") for i, v in enumerate(data)]
        return [v for v, _ in items], [key for _, keys in items for key in keys]
    return data, []


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
