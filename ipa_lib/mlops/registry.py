"""The MLflow model registry: register the aligned animator, promote it guardedly, roll back.

- `IPAAnimatorModel` is a pyfunc model carrying the base model folder, the LoRA adapter
  folder and a `params.yaml` snapshot as artifacts, and the `ipa_lib` package as its code
  (`code_paths`, put on `sys.path` when it loads). Loading `models:/ipa-animator@champion`
  needs only a Python with the model's pip requirements (`requirements.txt` in the model:
  mlflow, torch, diffusers, peft, ...), not this checkout; a base given as a hub id (not
  carried) is downloaded from the hub. `predict({"reference": (H,W,3) uint8,
  "pose_video": (F,H,W,3) uint8}, params={"seed", "num_inference_steps"})` returns the
  generated clip (F,H,W,3) uint8; a wan-animate model also takes `face_video` (F,S,S,3)
  and, in replacement mode, `background_video` (F,H,W,3) + `mask_video` (F,H,W) uint8
  (see `CONDITION_INPUTS`, `model_signature`). docs/mlflow-serving.md serves it over HTTP.
- `register_model` logs it with a signature and an input example, creates a version of
  `tracking.registered_model` with the evaluation numbers (`metrics/eval.json`) as version
  tags `eval.ipa.<k>` / `eval.base.<k>` and as metrics of the logged model, all set in the
  same call that creates the version (a version never exists without its numbers).
- `promote` moves the `champion` alias (aliases, not the deprecated stages) when the pure
  policy `decide` says so, records the decision and the compared numbers on the version
  (`ipa.promotion.*` tags) and appends a promotion-history record to the registered model
  (`ipa.history.<seq>` tags, see `promotion_history` / `champion_at`).

Race safety. MLflow has no compare-and-set on aliases, but creating a registered model
is atomic (a unique name in the registry database: the second creator gets
RESOURCE_ALREADY_EXISTS). `promotion_lock` uses that as a mutex (`tracking.store_lock`):
`<name>.promotion-lock` is created with a random token, an owner and a timestamp; the
holder re-reads the champion, decides, writes tags, moves the alias, re-reads the alias to
verify it, appends history, and deletes the lock. Others wait (`promote.lock_timeout_s`) and then decide
against the new champion; a lock older than `promote.lock_stale_s` is taken to be left
by a crashed process and removed. A verification re-read alone could not prevent two
promoters from both comparing against the same old champion and the worse one landing
last; the lock serialises the read-decide-write sequence so every decision is made
against the champion it replaces.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow.pyfunc  # the model class below subclasses PythonModel
import numpy as np
import yaml

from ipa_lib.core.config import Params, PromoteConfig, PromoteRule, load_params
from ipa_lib.core.decisions import Decision, MetricsError, decide, required_metrics
from ipa_lib.core.decisions import check_metrics as _check_metrics
from ipa_lib.core.errors import RuntimeFailure
from ipa_lib.core.io import atomic_write_json
from ipa_lib.core.metrics import EVAL_METRICS
from ipa_lib.mlops.tracking import (
    TELEMETRY_ENV,
    TrackingError,
    _who,
    configure,
    git_info,
    redact_uri,
    stage_run,
    store_lock,
)

for _k, _v in TELEMETRY_ENV.items():
    os.environ.setdefault(_k, _v)

METRIC_KEYS = EVAL_METRICS  # the evaluate stage's metrics, from the metric registry
TAG_CAND = "eval.ipa."  # version tag prefix: the candidate's numbers from metrics/eval.json
TAG_BASE = "eval.base."  # version tag prefix: the base model's numbers (what a first model must beat)
TAG_DECISION = "ipa.promotion."  # decision, reason, compared (JSON numbers), by (who at when); superseded_by
TAG_HISTORY = "ipa.history."  # registered-model tags ipa.history.000001, ... (JSON records)
LOCK_SUFFIX = ".promotion-lock"


class RegistryError(RuntimeFailure):
    """A registry operation that cannot go ahead; the alias is left unchanged."""


# ----------------------------------------------------------------------------- policy


def read_eval_metrics(path: str | Path, cfg: PromoteRule | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(candidate, base) numbers from `metrics/eval.json` = {"base": {...}, "ipa": {...}}."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: evaluation metrics not found; run `ipa evaluate` (dvc repro evaluate) first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MetricsError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("ipa"), dict) or not isinstance(data.get("base"), dict):
        raise MetricsError(f'{path}: expected {{"base": {{...}}, "ipa": {{...}}}}, got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}')
    need = required_metrics(cfg or PromoteConfig())
    out = []
    for entry in ("ipa", "base"):
        src = data[entry]
        nums = _check_metrics(f"{path} [{entry}]", src, need)
        # every other number travels along to the registry (hand_quality, hand_psnr, ...)
        for k, v in src.items():
            if k in nums or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and math.isfinite(v):
                nums[k] = float(v)
            elif k in METRIC_KEYS:
                raise MetricsError(f"{path} [{entry}]: metric {k!r} is not a finite number: {v!r}")
        out.append(nums)
    cand, base = out
    return cand, base


# ----------------------------------------------------------------------------- pyfunc model


def _build_backend(params: Params, base_model: str | None, adapter: str | None):
    return start_backend(params, base_model, adapter)


def start_backend(params: Params, base_model: str | Path | None = None, adapter: str | Path | None = None):
    """The backend a round runs: `base_model` (default `backend.base_model`) with
    `backend.init_adapter` merged, a `models:/` init_adapter resolved and downloaded first
    (a registered model carries the base its adapter was trained over, which then wins over
    `base_model`), and this round's `adapter` on top. The model factory sees local folders only."""
    from ipa_lib.models.factory import load_backend

    init = params.backend.init_adapter
    if init and init.startswith("models:/"):
        base_model, init, _ = resolve_start(params)
    return load_backend(params, base_model, adapter, init_adapter=init or "")


def _animate(backend, reference: np.ndarray, pose_video: np.ndarray, seed: int, num_inference_steps: int,
             conditions: dict[str, np.ndarray] | None = None) -> np.ndarray:
    from ipa_lib.models.generate import animate

    return animate(backend, reference, pose_video, seed=seed, num_inference_steps=num_inference_steps,
                   conditions=conditions)


# optional pyfunc inputs -> `ipa_lib.models.generate.animate` conditions (wan-animate only)
CONDITION_INPUTS = {"face_video": "face", "background_video": "background", "mask_video": "replace_mask"}


def _unbatch(x, ndim: int) -> np.ndarray:
    x = np.asarray(x)
    return x[0] if x.ndim == ndim + 1 and x.shape[0] == 1 else x


def _conditions(model_input: Mapping, pose: np.ndarray, backend_name: str) -> dict[str, np.ndarray]:
    """face_video (F,S,S,3) uint8; background_video (F,H,W,3) + mask_video (F,H,W) uint8
    (or (F,H,W,3); white = where the character goes, thresholded at half as in
    `ipa_lib.data.cases.load_case`) -> animate's conditions, checked against pose (F,H,W,3)."""
    given = [k for k in CONDITION_INPUTS if k in model_input and model_input[k] is not None]
    if not given:
        return {}
    if backend_name == "toy":
        raise ValueError(f"{', '.join(given)}: the toy backend takes only 'reference' and 'pose_video'")
    F, H, W = pose.shape[:3]
    out: dict[str, np.ndarray] = {}
    if "face_video" in given:
        face = _unbatch(model_input["face_video"], 4)
        if face.ndim != 4 or face.shape[-1] != 3 or face.shape[0] != F or face.shape[1] != face.shape[2]:
            raise ValueError(f"face_video must be (F, S, S, 3) square face crops with F = {F}, got {face.shape}")
        out["face"] = face.astype(np.uint8)
    if ("background_video" in given) != ("mask_video" in given):
        raise ValueError("replacement mode needs both 'background_video' and 'mask_video'")
    if "background_video" in given:
        bg = _unbatch(model_input["background_video"], 4)
        if bg.shape != pose.shape:
            raise ValueError(f"background_video must be (F, H, W, 3) = {pose.shape}, got {bg.shape}")
        mask = np.asarray(model_input["mask_video"])
        if mask.ndim in (4, 5) and mask.shape[-1] == 3:
            mask = mask.mean(-1)
        mask = _unbatch(mask, 3)
        if mask.shape != (F, H, W):
            raise ValueError(f"mask_video must be (F, H, W) = {(F, H, W)} (or (F, H, W, 3)), got {mask.shape}")
        out["background"] = bg.astype(np.uint8)
        out["replace_mask"] = (mask.astype(np.float32) / 255.0 > 0.5).astype(np.float32)
    return out


# log_model validates the input example by loading the model and predicting in-process; for
# a large base (wan-animate) register_model sets this so only the signature is checked
_SIGNATURE_CHECK_ONLY = False


class IPAAnimatorModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: base model + LoRA adapter + params snapshot -> animate."""

    # inputs are checked against the explicit signature (TensorSpecs), not predict's type hints
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        arts = context.artifacts
        self.params = load_params(arts["params"])
        base = arts.get("base_model") or self.params.backend.base_model  # hub id when not carried
        self.backend = None if _SIGNATURE_CHECK_ONLY else _build_backend(self.params, base, arts.get("adapter"))

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        """model_input: {"reference": (H,W,3) uint8, "pose_video": (F,H,W,3) uint8} and, for
        wan-animate, optional "face_video", "background_video" + "mask_video" (`_conditions`);
        a leading batch axis of 1 is accepted; params: seed, num_inference_steps. -> (F,H,W,3) uint8."""
        if not isinstance(model_input, Mapping) or not {"reference", "pose_video"} <= set(model_input):
            raise ValueError(f"input must be a dict with 'reference' and 'pose_video' arrays, got {type(model_input).__name__}")
        ref = np.asarray(model_input["reference"])
        pose = np.asarray(model_input["pose_video"])
        if ref.ndim == 4 and ref.shape[0] == 1:
            ref = ref[0]
        if pose.ndim == 5 and pose.shape[0] == 1:
            pose = pose[0]
        if ref.ndim != 3 or ref.shape[-1] != 3:
            raise ValueError(f"reference must be (H, W, 3), got {ref.shape}")
        if pose.ndim != 4 or pose.shape[-1] != 3 or pose.shape[1:3] != ref.shape[:2]:
            raise ValueError(f"pose_video must be (F, H, W, 3) with H, W = {ref.shape[:2]}, got {pose.shape}")
        conditions = _conditions(model_input, pose, self.params.backend.name)
        p = dict(params or {})
        seed = int(p.get("seed", self.params.evaluate.seeds[0] if self.params.evaluate.seeds else 0))
        steps = int(p.get("num_inference_steps", self.params.evaluate.num_inference_steps))
        if self.backend is None:  # register_model's example check for a heavy backend
            return np.zeros_like(pose, dtype=np.uint8)
        extra = {"conditions": conditions} if conditions else {}  # toy inputs: the call they always made
        out = _animate(self.backend, ref.astype(np.uint8), pose.astype(np.uint8), seed, steps, **extra)
        return np.asarray(out, dtype=np.uint8)


def model_signature(params: Params, *, replace: bool = False):
    """Tensor inputs reference + pose_video; a wan-animate model adds face_video, and with
    `replace` background_video + mask_video. MLflow (3.x) has no optional tensor inputs (a
    TensorSpec is always required and undeclared inputs are dropped before predict), so a
    toy model keeps the two inputs it always had, and the inputs a wan-animate model declares
    are the ones its requests must carry (every Wan-Animate case has a face video)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    u8 = np.dtype("uint8")
    inputs = [TensorSpec(u8, (-1, -1, 3), "reference"), TensorSpec(u8, (-1, -1, -1, 3), "pose_video")]
    if params.backend.name != "toy":
        inputs.append(TensorSpec(u8, (-1, -1, -1, 3), "face_video"))
        if replace:
            inputs += [TensorSpec(u8, (-1, -1, -1, 3), "background_video"), TensorSpec(u8, (-1, -1, -1), "mask_video")]
    return ModelSignature(
        inputs=Schema(inputs),
        outputs=Schema([TensorSpec(u8, (-1, -1, -1, 3), "clip")]),
        params=ParamSchema(
            [
                ParamSpec("seed", "long", int(params.evaluate.seeds[0] if params.evaluate.seeds else 0)),
                ParamSpec("num_inference_steps", "long", int(params.evaluate.num_inference_steps)),
            ]
        ),
    )


def input_example(params: Params, *, replace: bool = False) -> dict[str, np.ndarray]:
    """A small deterministic (reference, driving pose) pair at the toy resolution; for
    wan-animate also a face video (16 x 16 crops: the backend resizes them), and with
    `replace` a background and a mask (the right half), matching `model_signature`."""
    size, frames = (params.toy.size, params.toy.frames) if params.backend.name == "toy" else (32, 5)
    yy, xx = np.mgrid[0:size, 0:size]
    ref = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1), np.full_like(xx, 128)], -1)
    pose = np.zeros((frames, size, size, 3), np.uint8)
    for f in range(frames):  # a bar sweeping across the frame
        c = (f * size) // max(frames, 1)
        pose[f, :, c : c + max(size // 8, 1)] = 255
    out = {"reference": ref.astype(np.uint8), "pose_video": pose}
    if params.backend.name != "toy":
        face = np.zeros((frames, 16, 16, 3), np.uint8)
        face[:, 4:12, 4:12] = 200  # a bright square where a face crop would be
        out["face_video"] = face
        if replace:
            out["background_video"] = np.repeat(ref[None].astype(np.uint8), frames, 0)
            mask = np.zeros((frames, size, size), np.uint8)
            mask[:, :, size // 2 :] = 255
            out["mask_video"] = mask
    return out


# what loading and predicting imports (ipa_lib itself travels as the model's code, and
# ipa-align is not on any index): pinned to the versions installed here
MODEL_REQUIREMENTS = ("mlflow", "torch", "diffusers", "accelerate", "peft", "safetensors", "transformers",
                      "numpy", "pydantic", "pyyaml")


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in MODEL_REQUIREMENTS:
        try:  # without a local label (torch 2.x+cpu): installable from PyPI
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _code_paths() -> list[str]:
    """The `ipa_lib` package folder this process runs, logged as the model's code."""
    import ipa_lib

    return [str(Path(ipa_lib.__file__).resolve().parent)]


# ----------------------------------------------------------------------------- register


def _float_tag(v: float) -> str:
    return repr(float(v))  # round-trips exactly


def version_metrics(mv) -> tuple[dict[str, float], dict[str, float]]:
    """(candidate, base) numbers stored on a model version's tags."""
    cand, base = {}, {}
    for k, v in (mv.tags or {}).items():
        for prefix, dst in ((TAG_CAND, cand), (TAG_BASE, base)):
            if k.startswith(prefix):
                try:
                    dst[k[len(prefix) :]] = float(v)
                except ValueError:
                    pass
    return cand, base


def register_model(
    params: Params,
    adapter_dir: str | Path,
    base_model_dir: str | Path | None,
    metrics_path: str | Path,
    *,
    lineage_in: Mapping | None = None,
    record_path: str | Path | None = None,
    root: str | Path | None = None,
) -> int:
    """Log the aligned model as a pyfunc and register it; returns the new version number.

    adapter_dir: LoRA adapter folder (`train.out`); base_model_dir: base model folder
    (`pretrain.out`), or None / a hub id for backends that load the base themselves;
    metrics_path: `metrics/eval.json`. The version gets the numbers as tags at creation.
    record_path: where to write {"name", "version", "model_uri", "run_id", "lineage", ...}.
    """
    if not params.tracking.enabled:
        raise RegistryError("tracking.enabled is false: registering needs an MLflow store")
    cand, base = read_eval_metrics(metrics_path, params.promote_rule)  # fail before logging anything
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir() or not any(adapter_dir.iterdir()):
        raise RegistryError(f"{adapter_dir}: adapter folder missing or empty; run `ipa train` first")
    base_dir = Path(base_model_dir) if base_model_dir else None
    if base_dir is not None and not base_dir.is_dir():
        if params.backend.name == "toy":
            raise RegistryError(f"{base_dir}: base model folder missing; run `ipa pretrain` first")
        base_dir = None  # a hub id / remote base: recorded in the params snapshot instead

    import mlflow

    name = params.tracking.registered_model
    metrics_path = Path(metrics_path)
    with tempfile.TemporaryDirectory(prefix="ipa-register-") as tmp:
        snap = params.model_dump(mode="json")
        if params.backend.init_adapter and base_dir is not None and params.backend.name == "toy":
            # a later round trained its adapter over base + the previous champion's LoRA: the
            # registered model is that merged base plus this adapter, self-contained
            base_dir = merged_start_model(params, base_dir, Path(tmp) / "base_model")
            snap["backend"]["init_adapter"] = None
        # (a large base keeps init_adapter in the snapshot: loading merges it again)
        if base_dir is None and base_model_dir:
            snap["backend"]["base_model"] = str(base_model_dir)
        snap_path = Path(tmp) / "params.yaml"
        snap_path.write_text(yaml.safe_dump(snap, sort_keys=False))
        artifacts = {"adapter": str(adapter_dir.resolve()), "params": str(snap_path)}
        if base_dir is not None:
            artifacts["base_model"] = str(base_dir.resolve())

        with stage_run(params, "register", lineage_in, root=root) as run:
            example = input_example(params)
            kwargs: dict[str, Any] = dict(
                name="model",
                python_model=IPAAnimatorModel(),
                artifacts=artifacts,
                signature=model_signature(params),
                input_example=(example, {"seed": 0, "num_inference_steps": 2}),
                pip_requirements=_pip_requirements(),
                code_paths=_code_paths(),  # served outside this checkout: ipa_lib travels along
                metadata={"ipa": {"backend": params.backend.name, "registered_model": name}},
            )
            # MLflow loads the logged model and predicts the example: a real generation for the
            # toy backend; a large base is not loaded just for that (signature check only)
            global _SIGNATURE_CHECK_ONLY
            _SIGNATURE_CHECK_ONLY = params.backend.name != "toy"
            try:
                info = mlflow.pyfunc.log_model(**kwargs)
            finally:
                _SIGNATURE_CHECK_ONLY = False
            eval_metrics = {f"eval/{k}": v for k, v in cand.items()} | {f"eval/base/{k}": v for k, v in base.items()}
            mlflow.log_metrics(eval_metrics, model_id=info.model_id)  # logged-model + run metrics
            run.log_artifact(metrics_path)
            tags = {f"{TAG_CAND}{k}": _float_tag(v) for k, v in cand.items()}
            tags |= {f"{TAG_BASE}{k}": _float_tag(v) for k, v in base.items()}
            tags |= {
                "ipa.metrics_file": metrics_path.as_posix(),
                "ipa.round_run_id": str(run.round_run_id),
                "ipa.source_run_id": str(run.run_id),
                "ipa.model_id": str(info.model_id),  # the logged model holding the eval metrics
                "ipa.lineage": json.dumps(run.lineage.get("stages", {}), sort_keys=True),
                "ipa.git.commit": git_info(run.tracker.root)["commit"],
                "ipa.registered_by": _who(),
                "ipa.registered_at": _now_iso(),
                f"{TAG_DECISION}decision": "pending",
            }
            mv = mlflow.register_model(info.model_uri, name, tags=tags)
            version = int(mv.version)
            run.set_tags({"ipa.registered_model": name, "ipa.registered_version": version})
            desc = ", ".join(f"{k} {v:.4f}" for k, v in cand.items())
            run.tracker.client.update_model_version(name, mv.version, description=f"IPA adapter; eval: {desc}")
            lineage = dict(run.lineage)
    if record_path is not None:
        rec = {
            "name": name,
            "version": version,
            "model_uri": f"models:/{name}/{version}",
            "model_id": info.model_id,
            "run_id": lineage["stages"].get("register"),
            "metrics": {"ipa": cand, "base": base},
            "lineage": lineage,
        }
        atomic_write_json(record_path, rec)
    return version


def merged_start_model(params: Params, base_dir: str | Path, out: str | Path) -> Path:
    """Save the model a round started from (`base_dir` with `backend.init_adapter` merged,
    as `load_backend` builds it) as a base-model folder at `out`; toy backend only."""
    from ipa_lib.models.toy import TOY_CONFIG

    params = params.model_copy(deep=True)
    params.backend.device = "cpu"
    backend = start_backend(params, base_dir)
    config = Path(base_dir) / TOY_CONFIG
    extra = json.loads(config.read_text()) if config.is_file() else {}
    extra.pop("backend", None)
    extra["merged_init_adapter"] = params.backend.init_adapter
    backend.save_pretrained(out, extra)
    return Path(out)


# ----------------------------------------------------------------------------- helpers


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _err_code(err: Exception) -> str:
    return str(getattr(err, "error_code", ""))


def _get_model(client, name: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in _err_code(err) or "NOT_FOUND" in _err_code(err):
            raise RegistryError(
                f"registered model {name!r} not found in {redact_uri(uri)}; register one with `ipa register` "
                "or fix tracking.registered_model"
            ) from None
        raise


def _get_version(client, name: str, version: int | str):
    from mlflow.exceptions import MlflowException

    try:
        v = int(version)
    except (TypeError, ValueError):
        raise RegistryError(f"model version must be a positive integer, got {version!r}") from None
    if v < 1:
        raise RegistryError(f"model version must be a positive integer, got {version!r}")
    try:
        mv = client.get_model_version(name, str(v))
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in _err_code(err) or "NOT_FOUND" in _err_code(err):
            known = sorted(int(m.version) for m in client.search_model_versions(f"name = '{name}'"))
            raise RegistryError(f"{name} version {v} does not exist (versions: {known or 'none'})") from None
        raise
    if mv.status != "READY":
        raise RegistryError(f"{name} version {v} is {mv.status}, not READY")
    return mv


def champion_version(client, name: str, alias: str) -> int | None:
    """The version the alias points at, resolved explicitly (None if unset)."""
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if "INVALID_PARAMETER_VALUE" in _err_code(err) or "RESOURCE_DOES_NOT_EXIST" in _err_code(err):
            return None
        raise


def _candidate_numbers(mv, cfg: PromoteRule, name: str) -> tuple[dict, dict]:
    cand, base = version_metrics(mv)
    need = required_metrics(cfg)
    missing = [k for k in need if k not in cand]
    if missing:
        raise MetricsError(
            f"{name} version {mv.version} has no evaluation metrics {missing} (version tags {TAG_CAND}*); "
            "register models with `ipa register`, which reads metrics/eval.json"
        )
    return cand, base


@contextlib.contextmanager
def promotion_lock(client, name: str, timeout_s: float = 60.0, stale_s: float = 600.0, poll_s: float = 0.25) -> Iterator[str]:
    """Mutual exclusion between promoters of `name`: registered model `<name>.promotion-lock`
    held through `tracking.store_lock`. Yields the lock token. Raises RegistryError if another
    holder keeps it past `timeout_s`."""
    try:
        with store_lock(client, f"{name}{LOCK_SUFFIX}", f"promotion of {name!r}", timeout_s, stale_s, poll_s) as token:
            yield token
    except TrackingError as err:
        if type(err) is not TrackingError:
            raise
        raise RegistryError(str(err)) from None


def _append_history(client, name: str, rm, record: dict) -> int:
    """Append a JSON record as registered-model tag ipa.history.<seq>; call under the lock
    with `rm` read under it."""
    seqs = [int(k[len(TAG_HISTORY) :]) for k in rm.tags if k.startswith(TAG_HISTORY) and k[len(TAG_HISTORY) :].isdigit()]
    seq = max(seqs, default=0) + 1
    client.set_registered_model_tag(name, f"{TAG_HISTORY}{seq:06d}", json.dumps({"seq": seq, **record}, sort_keys=True))
    return seq


def promotion_history(params: Params, *, root: str | Path | None = None) -> list[dict]:
    """Every promotion decision on the registered model, oldest first."""
    tracker = configure(params, root, experiment=False)
    rm = _get_model(tracker.client, params.tracking.registered_model, tracker.uri)
    recs = [json.loads(v) for k, v in rm.tags.items() if k.startswith(TAG_HISTORY)]
    return sorted(recs, key=lambda r: r["seq"])


def champion_at(history: list[dict], when: float | datetime) -> int | None:
    """The champion version at a moment, from `promotion_history` records (None before the first)."""
    t = when.timestamp() if isinstance(when, datetime) else float(when)
    champ = None
    for rec in history:
        if rec["ts"] <= t:
            champ = rec["champion"]
    return champ


# ----------------------------------------------------------------------------- promote


def promote(
    params: Params,
    candidate: int | None = None,
    dry_run: bool = False,
    to_version: int | None = None,
    *,
    root: str | Path | None = None,
) -> Decision:
    """Decide whether `candidate` (default: the highest version) replaces the champion, and
    move the alias if so; `to_version` rolls the alias back to that version explicitly.

    Writes (unless dry_run): `ipa.promotion.*` tags on the decided version, the alias, a
    history record. Errors (unknown model/version, no metrics, unreachable store, lock
    timeout) raise RegistryError/TrackingError before the alias is touched.
    """
    if candidate is not None and to_version is not None:
        raise RegistryError("give either a candidate or --to-version, not both")
    tc, pc, rule = params.tracking, params.promote, params.promote_rule
    tracker = configure(params, root, experiment=False)
    client, name, alias = tracker.client, tc.registered_model, tc.alias
    _get_model(client, name, tracker.uri)

    rollback = to_version is not None
    if rollback:
        mv = _get_version(client, name, to_version)
        cand = base = None
    else:
        if candidate is None:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(f"registered model {name!r} has no versions")
            candidate = max(int(m.version) for m in versions)
        mv = _get_version(client, name, candidate)
        cand, base = _candidate_numbers(mv, rule, name)  # before the lock: a bad candidate changes nothing
    v = int(mv.version)

    lock = contextlib.nullcontext() if dry_run else promotion_lock(client, name, pc.lock_timeout_s, pc.lock_stale_s)
    with lock:
        rm = client.get_registered_model(name)  # re-read under the lock: aliases and history
        prev = int(rm.aliases[alias]) if alias in (rm.aliases or {}) else None
        if prev == v:
            d = Decision(False, f"version {v} is already {alias}", {}, "keep")
        elif rollback:
            d = Decision(True, f"explicit rollback of {alias} from v{prev} to v{v}", {}, "rollback")
        else:
            champ_metrics = None
            if prev is not None:
                champ_metrics, _ = version_metrics(client.get_model_version(name, str(prev)))
                missing = [k for k in required_metrics(rule) if k not in champ_metrics]
                if missing:
                    raise MetricsError(
                        f"current {alias} {name} v{prev} lacks metrics {missing}; promote explicitly with --to-version"
                    )
            label = f"{alias} v{prev}" if prev is not None else "base model"
            d = decide(cand, champ_metrics, base if prev is None else None, rule, reference_label=label)
        d.compared["reference_version"] = prev
        d.candidate, d.previous_champion, d.dry_run, d.model = v, prev, dry_run, name
        d.champion = v if d.promote else prev
        if not dry_run and d.action != "keep":
            _apply(client, name, alias, rm, d)
    return d


def _apply(client, name: str, alias: str, rm, d: Decision) -> None:
    """Tags first (the why), then the alias, then verify and append history. Under the lock."""
    now, who = _now_iso(), _who()
    tags = {
        "decision": {"promote": "promoted", "reject": "rejected", "rollback": "rollback"}[d.action],
        "reason": d.reason,
        "compared": json.dumps(d.compared, sort_keys=True),  # numbers + reference_version
        "by": f"{who} at {now}",
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, str(d.candidate), f"{TAG_DECISION}{k}", v)
    if d.promote:
        client.set_registered_model_alias(name, alias, str(d.candidate))
        now_champ = champion_version(client, name, alias)
        if now_champ != d.candidate:
            raise RegistryError(
                f"{alias} of {name} points at v{now_champ} right after setting it to v{d.candidate}: "
                "someone moved it without the promotion lock"
            )
        if d.previous_champion is not None:
            client.set_model_version_tag(name, str(d.previous_champion), f"{TAG_DECISION}superseded_by", str(d.candidate))
    pm = d.compared.get("primary_metric")
    _append_history(
        client,
        name,
        rm,
        {
            "at": now,
            "ts": time.time(),
            "by": who,
            "action": d.action,
            "candidate": d.candidate,
            "previous_champion": d.previous_champion,
            "champion": d.champion,
            "reason": d.reason,
            "primary": {
                "metric": pm,
                "candidate": d.compared["candidate"][pm],
                "reference": d.compared["reference_metrics"][pm],
            }
            if pm
            else None,
        },
    )


# ----------------------------------------------------------------------------- fetch


@dataclass
class FetchedModel:
    name: str
    version: int
    uri: str  # models:/name/version, the alias resolved
    root: Path  # the downloaded model folder (MLmodel, artifacts/)
    adapter: Path
    base_model: str  # a local folder, or the hub id the model was registered with
    params_file: Path


def fetch_model(params: Params, uri: str, dst: str | Path | None = None, *, root: str | Path | None = None) -> FetchedModel:
    """Download `models:/name@alias` or `models:/name/version` and return its folders, e.g. to
    start sampling for the next round from the champion (`backend.init_adapter`)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri!r} is not a models:/ URI")
    tracker = configure(params, root, experiment=False)
    client = tracker.client
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        _get_model(client, name, tracker.uri)
        v = champion_version(client, name, alias)
        if v is None:
            raise RegistryError(f"{name} has no version with alias {alias!r}; promote one first (`ipa promote`)")
    elif "/" in ref:
        name, ver = ref.rsplit("/", 1)
        _get_model(client, name, tracker.uri)
        v = int(_get_version(client, name, ver).version)
    else:
        raise RegistryError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{v}", dst_path=str(dst) if dst else None))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    arts = {k: local / a["path"] for k, a in (mlmodel["flavors"]["python_function"].get("artifacts") or {}).items()}
    snap = load_params(arts["params"])
    base = str(arts["base_model"]) if "base_model" in arts else snap.backend.base_model
    return FetchedModel(name, v, f"models:/{name}/{v}", local, arts["adapter"], base, arts["params"])


def resolve_start(params: Params, dst: str | Path | None = None) -> tuple[str, str | None, dict[str, str]]:
    """(base_model, adapter, tags) a stage should build its backend from: `backend.base_model`
    and `backend.init_adapter`, where an init_adapter `models:/name@champion` is resolved to
    its version and downloaded (the next round starts from the champion). `tags` record
    which model version was used, for the stage run (`run.set_tags(tags)`)."""
    init = params.backend.init_adapter
    if not init or not init.startswith("models:/"):
        return params.backend.base_model, init, {}
    m = fetch_model(params, init, dst)
    return m.base_model, str(m.adapter), {"ipa.init_model": f"{m.name}/{m.version}", "ipa.init_model_uri": init}
