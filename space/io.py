"""Atomic file writes: write to a temporary file beside the target, then rename over it.

An exception (or a full disk) mid-write leaves the previous file intact and no temporary behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
