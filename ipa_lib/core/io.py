"""Atomic outputs: a stage writes into a temp sibling and renames it into place, so a
crash never leaves a half-written folder where the next stage (or DVC) would trust it."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, data: object) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Compressed shard written atomically (np.savez appends .npz to names without it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: shard not found")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except Exception as err:  # zipfile.BadZipFile, EOFError, ValueError...
        raise ValueError(f"{path}: corrupt or truncated shard: {err}") from None


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def require_dir(path: str | Path, what: str, must_contain: str | None = None) -> Path:
    """A clear error for a missing input folder (and the file a stage expects inside it)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} folder not found")
    if must_contain and not (path / must_contain).exists():
        raise FileNotFoundError(f"{path}: {what} folder has no {must_contain}")
    return path


def jsonable(x):
    """`x` with numpy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
