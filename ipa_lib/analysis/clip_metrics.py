"""Metrics computed from stored clips: Frechet distances and two artefact probes per clip.

With clips, the report adds Frechet distances in the feature space of the toy extractors
(`ipa_lib.analysis.features`, whole clip and hand region) and two artefact probes per clip:
`score_gaps` (toy scorer: gaps between fingers left clear; extra fingers, melted palms and
blur fill them) and `hand_sharpness` (gradient energy in the hand mask relative to the
ground truth; < 1 = blurrier).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from ipa_lib.analysis.cells import SET_METRICS, Cell


def hand_sharpness(video: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Gradient energy inside the hand mask, generated / ground truth (1 = as sharp; < 1 blurrier)."""
    def energy(v):
        g = v.astype(np.float64).mean(-1)
        gx, gy = np.diff(g, axis=-1)[..., :-1, :], np.diff(g, axis=-2)[..., :, :-1]
        return float((np.hypot(gx, gy) * mask[..., :-1, :-1]).sum())

    ref = energy(target)
    return energy(video) / ref if ref > 0 else math.nan


def reference_set(params: dict) -> dict[str, np.ndarray]:
    """The held-out real clips the evaluation poses come from (ground truth of those poses)."""
    from ipa_lib.core.config import parse_params
    from ipa_lib.data.toyworld import toy_conditions

    p = parse_params(params)
    return toy_conditions(p.evaluate.pose_seed, p.evaluate.num_poses, p.toy.frames, p.toy.size, p.toy.motion)


def add_clip_metrics(cells: Sequence[Cell], extractors: dict | None) -> dict:
    """Fill `feats`, `real`, `set_metrics` and the per-clip probes of every cell that stored clips.

    `extractors`: {"fd": callable, "hand_fd": callable on hand views} (any clips -> features
    callables), or None to skip FD. Returns {"real_floor": {metric: FD of two real sets}}.
    """
    from ipa_lib.analysis.features import frechet_distance, hand_view
    from ipa_lib.data.tensors import hand_masks
    from ipa_lib.data.toy_quality import ToyHandScorer

    with_clips = [c for c in cells if c.clips is not None]
    if not with_clips:
        return {}
    params = with_clips[0].params
    ref = reference_set(params)
    n = len(ref["target"])
    masks = hand_masks(ref["hand_keypoints"], *ref["target"].shape[2:4])
    scorer = ToyHandScorer()
    real, floor = {}, {}
    if extractors:
        real = {"fd": extractors["fd"](ref["target"]), "hand_fd": extractors["hand_fd"](hand_view(ref["target"], ref["hand_keypoints"]))}
        # noise floor: the same poses' real clips against another draw of real clips (other identities)
        other = reference_set({**params, "evaluate": {**params.get("evaluate", {}), "pose_seed": int(params.get("evaluate", {}).get("pose_seed", 99_000)) + 50_000}})
        floor = {"fd": frechet_distance(extractors["fd"](other["target"]), real["fd"]),
                 "hand_fd": frechet_distance(extractors["hand_fd"](hand_view(other["target"], other["hand_keypoints"])), real["hand_fd"])}
    cache: dict[bytes, tuple] = {}  # the base clips are identical in every cell: compute once
    for c in with_clips:
        if _protocol(c.params) != _protocol(params):
            raise ValueError(f"cell {c.name}: toy/evaluate params differ from cell {with_clips[0].name}; one report needs one evaluation protocol")
        c.real = real
        seeds = [int(s) for s in c.clips.get("seeds", sorted({r["seed"] for r in c.rows}))]
        for model in ("base", "ipa"):
            video = c.clips[model]  # (S, N, F, H, W, 3)
            if video.shape[1] != n:
                raise ValueError(f"cell {c.name}: clips.npz has {video.shape[1]} poses, evaluate.num_poses is {n}")
            digest = hashlib.sha1(np.ascontiguousarray(video).tobytes()).digest() + bytes(str(video.shape), "ascii")
            if digest not in cache:
                flat = video.reshape(-1, *video.shape[2:])
                kps = np.tile(ref["hand_keypoints"], (len(seeds), 1, 1, 1, 1))
                feats, sm = {}, {}
                if extractors:
                    feats["fd"] = extractors["fd"](flat)
                    feats["hand_fd"] = extractors["hand_fd"](hand_view(flat, kps))
                    sm = {m: frechet_distance(feats[m], real[m]) for m in SET_METRICS}
                probes = {}
                for si, s in enumerate(seeds):
                    for i in range(n):
                        pose = int(params["evaluate"]["pose_seed"]) + i
                        comp = scorer.score(video[si, i], ref["hand_keypoints"][i])
                        probes[(s, pose)] = {"score_gaps": comp["score_gaps"],
                                             "hand_sharpness": hand_sharpness(video[si, i], ref["target"][i], masks[i])}
                cache[digest] = (feats, sm, probes)
            feats, sm, probes = cache[digest]
            for m, f in feats.items():
                c.feats[(model, m)] = f
            if sm:
                c.set_metrics.setdefault(model, {}).update(sm)
            for r in c.rows:
                if r["model"] == model and (int(r["seed"]), int(r["pose"])) in probes:
                    r.update(probes[(int(r["seed"]), int(r["pose"]))])
    return {"real_floor": floor}


def _protocol(params: dict) -> tuple:
    """A cell's evaluation protocol: its toy and evaluate params with the defaults filled in (a
    cell run before a later-added key existed states it implicitly) and the outputs' paths and
    the execution-only keys (shards, workers) left out."""
    from ipa_lib.core.config import EvaluateConfig, ToyConfig

    ev = EvaluateConfig(**(params.get("evaluate") or {})).model_dump(exclude={"out", "metrics", "val_metrics", "shards", "workers"})
    return ToyConfig(**(params.get("toy") or {})).model_dump(), ev
