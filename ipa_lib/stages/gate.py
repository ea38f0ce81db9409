"""Gate stage: score every sample's hands, validate the scored manifest, keep the best.

The score comes from a hand-quality scorer that is independent of the training
objective (toy scorer for the toy world, MediaPipe for real videos). Great Expectations
checks the scored manifest before anything is selected; a failing check stops the stage
with a report naming the expectation and rows, and nothing is passed on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ipa_lib.core.config import GateConfig, Params


def make_scorer(cfg: GateConfig):
    if cfg.scorer == "toy":
        from ipa_lib.data.toy_quality import ToyHandScorer

        return ToyHandScorer()
    from ipa_lib.data.hands.quality import MediaPipeHandScorer

    return MediaPipeHandScorer(model_path=cfg.hand_landmarker)


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

    cfg = params.gate
    samples_dir = require_dir(samples_dir, "samples", "manifest.jsonl")
    rows = read_manifest(samples_dir)
    real = bool(params.sample.videos_dir) or cfg.scorer == "mediapipe"
    arrays = None
    if not real:
        arrays, rows = _load_clips(samples_dir, rows)

    with make_scorer(cfg) as scorer:
        for i, row in enumerate(tqdm(rows, desc=f"gate[{cfg.scorer}]", disable=not progress, leave=False)):
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
        atomic_write_json(tmp / "summary.json", summary)
    return summary
