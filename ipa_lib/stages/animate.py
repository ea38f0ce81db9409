"""`ipa animate`: one clip from one case, with a registered model or a base folder (+ adapter).

The model is `models:/name@alias` / `models:/name/version` (downloaded and built as the
registered pyfunc builds itself: its params snapshot's backend, its base, its adapter) or a
local base folder with an optional adapter folder (`backend.*` of the params, as the stages
load it). The case is read at `data.height` x `data.width`, `data.frames` frames at
`data.fps` (`ipa_lib.data.cases.load_case`), animated with its face video (and background +
mask in replacement mode), and written as an mp4 at `data.fps` with a strip
(driver pose | clip) next to it: `<out stem>_strip.png` (+ `.gif`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ipa_lib.core.errors import InputError

STRIP_FRAMES = 9  # frames shown in the strip, evenly spaced over the clip
STRIP_MIN_PX = 128  # a small clip is scaled up to about this height in the strip


def _registered_backend(params, uri: str, tmp: str):
    """The backend of a registered model, built the way its pyfunc `load_context` builds it."""
    from ipa_lib.core.config import load_params
    from ipa_lib.mlops.registry import fetch_model, start_backend

    m = fetch_model(params, uri, Path(tmp) / "model")
    snap = load_params(m.params_file)
    snap.backend.device = params.backend.device  # where to run is this machine's choice
    return start_backend(snap, m.base_model, m.adapter), {"model_uri": m.uri, "model_version": m.version}


def _folder_backend(params, base: str, adapter: str | None):
    from ipa_lib.stages.common import load_start_backend

    if not Path(base).exists():
        raise InputError(f"--model {base}: no such folder (a base model folder or a models:/ URI)")
    if params.backend.name == "toy" and (Path(base) / "model_index.json").is_file():
        raise InputError(f"--model {base} is a diffusers pipeline folder but backend.name is toy; "
                         "add --set backend.name=wan-animate")  # fmt: skip
    return load_start_backend(params, base, adapter), {}


def _strip(stem: Path, pose: np.ndarray, clip: np.ndarray) -> Path:
    from ipa_lib.data.visualize import side_by_side

    idx = np.unique(np.linspace(0, len(clip) - 1, min(STRIP_FRAMES, len(clip))).round().astype(int))
    scale = max(1, STRIP_MIN_PX // clip.shape[1])
    png, _ = side_by_side(stem, {"driver pose": pose[idx][None], "clip": clip[idx][None]}, scale=scale)
    return png


def animate_case(params, model: str, case_dir: str | Path, out: str | Path, *, adapter: str | None = None,
                 seed: int | None = None, steps: int | None = None) -> dict:
    """Animate one case with `model`; writes `out` (mp4) and its strip. Returns what it did.

    seed defaults to `evaluate.seeds[0]`, steps to `evaluate.num_inference_steps`. A bad
    case raises CaseError naming it and the problem, before any model is loaded."""
    from ipa_lib.data.cases import CaseError, load_case, probe_case
    from ipa_lib.data.video import write_video
    from ipa_lib.models.generate import animate

    case_dir, out, data = Path(case_dir), Path(out), params.data
    if not case_dir.is_dir():
        raise CaseError(case_dir, "not a folder (a case folder holds src_ref.png, src_pose.mp4, src_face.mp4)")
    row = probe_case(case_dir, data)
    if not row["ok"]:
        raise CaseError(case_dir, row["error"])
    seed = int(seed if seed is not None else (params.evaluate.seeds[0] if params.evaluate.seeds else 0))
    steps = int(steps if steps is not None else params.evaluate.num_inference_steps)
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    registered = model.startswith("models:/")
    if registered and adapter:
        raise InputError("--adapter goes with a base folder; a registered model carries its own adapter")

    case = load_case(case_dir, data)
    conditions = {k: case[k] for k in ("face", "background", "replace_mask") if k in case}
    with tempfile.TemporaryDirectory(prefix="ipa-animate-") as tmp:
        backend, info = _registered_backend(params, model, tmp) if registered else _folder_backend(params, model, adapter)
        clip = animate(backend, case["reference"], case["pose"], seed=seed, num_inference_steps=steps,
                       conditions=conditions)  # fmt: skip
    write_video(out, clip, fps=data.fps)
    strip = _strip(out.with_name(f"{out.stem}_strip"), case["pose"], clip)
    return {"case": row["case_id"], "mode": row["mode"], "model": model, **info, "adapter": adapter, "seed": seed,
            "num_inference_steps": steps, "frames": int(len(clip)), "height": int(clip.shape[1]),
            "width": int(clip.shape[2]), "fps": float(data.fps), "out": str(out), "strip": str(strip)}  # fmt: skip
