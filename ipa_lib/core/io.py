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


SHARED_PREFIX = "__shared__"  # npz key of an array kept once in a shared store: its file, relative to the npz's folder


def share_arrays(path: str | Path, store: str | Path, keys: tuple[str, ...]) -> dict[str, str]:
    """Move the arrays `keys` of the npz `path` into content-addressed files under `store`
    (`<sha256 of dtype, shape and bytes, 16 hex>.npz`, written once however many files hold the
    same array) and leave in `path` a pointer `__shared__<key>` (the store file, relative to
    `path`'s folder). `load_shared_npz` puts them back. Returns {key: store file} of the moved
    arrays; keys the file lacks are left alone. Rewrites are atomic (`save_npz`)."""
    import hashlib

    path, store = Path(path), Path(store)
    arrays = load_npz(path)
    moved: dict[str, str] = {}
    for key in keys:
        if key not in arrays:
            continue
        a = np.ascontiguousarray(arrays.pop(key))
        digest = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()[:16]
        target = store / f"{digest}.npz"
        if not target.exists():
            save_npz(target, array=a)
        rel = os.path.relpath(target.resolve(), path.parent.resolve())
        arrays[SHARED_PREFIX + key] = np.array(rel)
        moved[key] = rel
    if moved:
        save_npz(path, **arrays)
    return moved


def load_shared_npz(path: str | Path) -> dict[str, np.ndarray]:
    """`load_npz` with the arrays `share_arrays` moved out put back (a missing store file is
    named in the error)."""
    path = Path(path)
    arrays = load_npz(path)
    for key in [k for k in arrays if k.startswith(SHARED_PREFIX)]:
        target = path.parent / str(arrays.pop(key))
        if not target.exists():
            raise FileNotFoundError(f"{path}: its {key[len(SHARED_PREFIX):]!r} array lives in {target}, which is missing")
        arrays[key[len(SHARED_PREFIX):]] = load_npz(target)["array"]
    return arrays


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
