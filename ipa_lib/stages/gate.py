"""Gate stage: score every sample's hands, validate the scored manifest, keep the best.

The score comes from a hand-quality scorer that is independent of the training
objective (toy scorer for the toy world, MediaPipe for real videos). Great Expectations
checks the scored manifest before anything is selected; a failing check stops the stage
with a report naming the expectation and rows, and nothing is passed on.

On cases (`Params.on_cases`: backend wan-animate on `data.cases`; `gate_cases`) the input is the sample stage's case clip store and
the output is one too, which the train stage reads with `ClipStore`:
    clips.npz       every decodable scored clip, key = sample_id, (F, H, W, 3) uint8
    masks.npz       its hand mask, key = sample_id, (F, H, W) uint8 0/1 at pixel size (training
                    maps it to the latent grid by the Wan 4x8x8 rule, `backend.mask_to_latent`)
    cases/          the per-case conditioning, copied from the samples
    manifest.jsonl  every row: hand_score, score_*, kept, decodable, error, and "video" =
                    "clips.npz#<sample_id>", "mask" = "masks.npz#<sample_id>" ("source_video":
                    where the clip came from)
    summary.json, report.md/.json
Each clip is scored by MediaPipe (VIDEO mode, `data.fps`, CASE_WEIGHTS of
`ipa_lib.data.hands.quality`) against the driver's hands (the case's hands.json); a case
without hands.json (all-zero keypoints) is scored reference-free. Hand masks: dilated boxes
around the detected hands; a frame without any detection takes the driver's hand mask
(boxes around its hands.json keypoints), so the loss still weights where a hand belongs.
A bad clip (missing or corrupt shard entry, wrong shape, detector error) is reported in
its row (decodable false, error) and skipped; the batch goes on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ipa_lib.core.config import GateConfig, Params
from ipa_lib.core.errors import InputError


def make_scorer(cfg: GateConfig, name: str | None = None, **kwargs):
    """The scorer `name` (default `cfg.scorer`; "auto" means toy: `Params.gate_scorer` resolves
    it by the world); kwargs go to MediaPipeHandScorer (weights, fps)."""
    if (name or cfg.scorer) in ("toy", "auto"):
        from ipa_lib.data.toy_quality import ToyHandScorer

        return ToyHandScorer()
    from ipa_lib.data.hands.quality import MediaPipeHandScorer

    return MediaPipeHandScorer(model_path=cfg.hand_landmarker, **kwargs)


def select(scores: np.ndarray, threshold: float, top_k: int) -> np.ndarray:
    """Boolean mask of kept samples: score >= threshold, best `top_k` of those (ties by index)."""
    order = np.argsort(-scores, kind="stable")
    keep = np.zeros(len(scores), dtype=bool)
    passing = [i for i in order if scores[i] >= threshold][:top_k]
    keep[passing] = True
    return keep


def _load_clips(samples_dir: Path, rows: list[dict]) -> tuple[dict[str, np.ndarray] | None, list[dict]]:
    """Toy shards: mark each row decodable (its shard entry exists) and return the arrays."""
    from ipa_lib.core.io import load_npz

    shards: dict[str, dict[str, np.ndarray]] = {}
    for row in rows:
        name, _, index = str(row.get("video", "")).partition("#")
        try:
            if name not in shards:
                shards[name] = load_npz(samples_dir / name)
            row["decodable"] = 0 <= int(index) < len(shards[name]["video"])
            row["error"] = None if row["decodable"] else f"{name}: no clip #{index}"
        except (ValueError, FileNotFoundError) as err:
            row["decodable"], row["error"] = False, str(err)
    if len(shards) != 1:
        return None, rows
    return next(iter(shards.values())), rows


def gate(params: Params, samples_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    import pandas as pd
    from tqdm.auto import tqdm

    from ipa_lib.data.checks import check_or_raise
    from ipa_lib.core.io import atomic_dir, atomic_write_json, require_dir, save_npz
    from ipa_lib.data.clip_store import read_manifest

    if params.on_cases:
        return gate_cases(params, samples_dir, out_dir, progress)
    cfg = params.gate
    name = params.gate_scorer
    samples_dir = require_dir(samples_dir, "samples", "manifest.jsonl")
    rows = read_manifest(samples_dir)
    real = name == "mediapipe"
    arrays = None
    if not real:
        arrays, rows = _load_clips(samples_dir, rows)

    with make_scorer(cfg, name) as scorer:
        for i, row in enumerate(tqdm(rows, desc=f"gate[{name}]", disable=not progress, leave=False)):
            if not row.get("decodable", True):
                continue
            if arrays is not None:
                j = int(row["video"].partition("#")[2])
                scores = scorer.score(arrays["video"][j], arrays["hand_keypoints"][j])
            else:
                from ipa_lib.data.video import read_video

                scores = scorer.score(read_video(samples_dir / row["video"]), None)
            row.update(scores)
        score_columns = ["hand_score"] + [f"score_{c}" for c in scorer.components]

    df = pd.DataFrame(rows)
    for col in score_columns:
        if col not in df:
            df[col] = np.nan
    hand = df["hand_score"].fillna(-1.0).to_numpy(dtype=float)
    if cfg.subset is not None:  # a biased gated set: clips of other identities never pass
        from ipa_lib.data.toyworld import shirt_colour

        if arrays is None:
            raise InputError(f"gate.subset={cfg.subset}: only the toy world's identities have a shirt colour")
        df["subset"] = [shirt_colour(arrays["reference"][int(v.partition("#")[2])]) for v in df["video"]]
        hand = np.where(df["subset"].to_numpy() == cfg.subset, hand, -1.0)
    df["kept"] = select(hand, cfg.threshold, cfg.top_k)
    expected = {} if real else {"num_frames": params.toy.frames, "height": params.toy.size, "width": params.toy.size}
    # the report lands beside the output folder first, so a failed check still leaves it
    out_dir = Path(out_dir)
    report_stem = out_dir.parent / f"{out_dir.name}-report"
    report = check_or_raise(df, report_stem, min_kept=cfg.min_kept, threshold=cfg.threshold,
                            score_columns=score_columns, num_frames=expected.get("num_frames"),
                            height=expected.get("height"), width=expected.get("width"),
                            # real folders: broken files are reported per file and the batch goes on
                            decodable_mostly=0.5 if real else 1.0)
    with atomic_dir(out_dir) as tmp:
        for ext in (".md", ".json"):
            if report_stem.with_suffix(ext).exists():
                shutil.copy(report_stem.with_suffix(ext), tmp / f"report{ext}")
        kept = df["kept"].to_numpy()
        if arrays is not None:
            j = np.array([int(v.partition("#")[2]) for v in df["video"]])
            base = {k: arrays[k][j] for k in ("video", "reference", "pose", "hand_keypoints", "pose_id")}
            save_npz(tmp / "kept.npz", **{k: v[kept] for k, v in base.items()})
            save_npz(tmp / "scored.npz", **base, hand_score=hand, kept=kept)
        (tmp / "manifest.jsonl").write_text(df.to_json(orient="records", lines=True))
        summary = {
            "given": len(df), "scored": int(np.isfinite(df["hand_score"].to_numpy(dtype=float)).sum()),
            "kept": int(kept.sum()), "threshold": cfg.threshold, "top_k": cfg.top_k,
            "pass_rate": float((hand >= cfg.threshold).mean()),
            "mean_score": float(np.nanmean(df["hand_score"].to_numpy(dtype=float))),
            "mean_kept_score": float(hand[kept].mean()) if kept.any() else None,
            "checks_passed": bool(report.success),
        }
        if cfg.subset is not None:
            summary["subset"] = cfg.subset
        atomic_write_json(tmp / "summary.json", summary)
    return summary


# ---- cases -----------------------------------------------------------------------------

MASK_WINDOW = 16  # frames per mask window: a long clip's float masks never sit in memory whole


class NpzWriter:
    """An npz written one array at a time (what np.savez_compressed writes, readable by np.load)."""

    def __init__(self, path: Path) -> None:
        import zipfile

        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)

    def add(self, key: str, array: np.ndarray) -> None:
        with self._zip.open(f"{key}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def driver_keypoints(conditions: dict) -> np.ndarray | None:
    """The driver's hands (F, 2, 21, 3) from a case's conditioning; None when it has none
    (no hands.json: all zeros), so the clip is scored reference-free."""
    kp = conditions.get("hand_keypoints")
    if kp is None or not np.any(kp):
        return None
    return np.asarray(kp, np.float32)


def hand_mask(detections, driver: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """(F, H, W) uint8 0/1: dilated boxes around the detected hands; a frame without any
    detection takes the driver's hand mask (zeros without a driver), in MASK_WINDOW windows."""
    from ipa_lib.data.hands.masks import detections_mask, keypoints_mask

    out = np.zeros((len(detections), height, width), np.uint8)
    for a in range(0, len(detections), MASK_WINDOW):
        window = detections[a : a + MASK_WINDOW]
        m = detections_mask(window, height, width) > 0
        empty = [i for i, d in enumerate(window) if not d]
        if empty and driver is not None:
            m[empty] = keypoints_mask(driver[a : a + MASK_WINDOW][empty], height, width) > 0
        out[a : a + len(window)] = m
    return out


def _score_clip(scorer, store, row: dict, data) -> tuple[dict, np.ndarray, np.ndarray]:
    """(scores, clip, mask) of one manifest row; ValueError / RuntimeError say what is wrong."""
    want = (data.frames, data.height, data.width, 3)
    clip = store.clip(row)
    if clip.dtype != np.uint8 or clip.shape != want:
        raise ValueError(f"{row['video']}: clip is {clip.dtype} {clip.shape}, expected uint8 {want}")
    try:
        conditions = store.conditions(row["case_id"])
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"conditioning of case {row.get('case_id')!r}: {err}") from None
    driver = driver_keypoints(conditions)
    if driver is not None and driver.shape != (data.frames, 2, 21, 3):
        raise ValueError(f"case {row['case_id']}: hand_keypoints {driver.shape}, expected ({data.frames}, 2, 21, 3)")
    detections = scorer.detect_clip(clip[i] for i in range(len(clip)))  # frames fed one at a time
    scores = scorer.score_detections(detections, driver)
    return scores, clip, hand_mask(detections, driver, data.height, data.width)


def gate_cases(params: Params, samples_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Gate a case clip store (see the module docstring): score, check, keep the best."""
    import pandas as pd
    from tqdm.auto import tqdm

    from ipa_lib.core.io import atomic_dir, atomic_write_json, require_dir
    from ipa_lib.data.checks import check_or_raise
    from ipa_lib.data.clip_store import CASES_DIR, MANIFEST, ClipStore, read_manifest
    from ipa_lib.data.hands.quality import CASE_WEIGHTS

    cfg, data = params.gate, params.data
    name = params.gate_scorer
    if name != "mediapipe":
        raise InputError(f"gate.scorer={cfg.scorer}: cases are gated by mediapipe (or auto)")
    if cfg.subset is not None:
        raise InputError(f"gate.subset={cfg.subset}: only the toy world's identities have a shirt colour")
    samples_dir = require_dir(samples_dir, "samples", MANIFEST)
    rows = read_manifest(samples_dir)
    out_dir = Path(out_dir)
    # the report lands beside the output folder first, so a failed check still leaves it
    report_stem = out_dir.parent / f"{out_dir.name}-report"
    with atomic_dir(out_dir) as tmp:
        with make_scorer(cfg, name, weights=CASE_WEIGHTS, fps=data.fps) as scorer, ClipStore(samples_dir) as store, \
                NpzWriter(tmp / "clips.npz") as clips, NpzWriter(tmp / "masks.npz") as masks:  # fmt: skip
            for row in tqdm(rows, desc=f"gate[{name}]", disable=not progress, leave=False):
                sid = row["sample_id"]
                try:
                    scores, clip, mask = _score_clip(scorer, store, row, data)
                except Exception as err:  # noqa: BLE001 - one bad clip never stops the batch
                    scores, clip, mask = {}, None, None
                    row["decodable"], row["error"] = False, f"{type(err).__name__}: {err}"
                row["source_video"] = row.get("video")
                row["video"], row["mask"] = f"clips.npz#{sid}", None
                if clip is None:
                    continue
                clips.add(sid, clip)
                masks.add(sid, mask)
                row.update(scores, decodable=True, error=None, mask=f"masks.npz#{sid}")
            score_columns = ["hand_score"] + [f"score_{c}" for c in scorer.components]

        df = pd.DataFrame(rows)
        for col in score_columns:
            if col not in df:
                df[col] = np.nan
        hand = df["hand_score"].astype(float).fillna(-1.0).to_numpy(dtype=float)
        df["kept"] = select(hand, cfg.threshold, cfg.top_k)
        report = check_or_raise(df, report_stem, min_kept=cfg.min_kept, threshold=cfg.threshold,
                                score_columns=score_columns, num_frames=data.frames, height=data.height,
                                width=data.width, decodable_mostly=0.5)  # fmt: skip
        for ext in (".md", ".json"):
            if report_stem.with_suffix(ext).exists():
                shutil.copy(report_stem.with_suffix(ext), tmp / f"report{ext}")
        if (samples_dir / CASES_DIR).is_dir():
            shutil.copytree(samples_dir / CASES_DIR, tmp / CASES_DIR)
        (tmp / MANIFEST).write_text(df.to_json(orient="records", lines=True))
        kept = df["kept"].to_numpy()
        scored = df["hand_score"].astype(float).to_numpy()
        summary = {
            "given": len(df), "scored": int(np.isfinite(scored).sum()),
            "kept": int(kept.sum()), "threshold": cfg.threshold, "top_k": cfg.top_k,
            "pass_rate": float((hand >= cfg.threshold).mean()),
            "mean_score": float(np.nanmean(scored)) if np.isfinite(scored).any() else None,
            "mean_kept_score": float(hand[kept].mean()) if kept.any() else None,
            "checks_passed": bool(report.success),
        }  # fmt: skip
        atomic_write_json(tmp / "summary.json", summary)
    return summary
