"""The knobs the experiments in docs/results.md turn: train.optimizer, train.save_at +
evaluate.along (adapters along the budget), evaluate.train_poses (train / held-out gap) and
gate.subset (a biased gated set)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import adapter_state
from ipa_lib.core.errors import InputError


def test_shirt_colour_is_the_identity_dominant_channel():
    from ipa_lib.data.toyworld import SHIRT_COLOURS, make_clip, sample_identity, shirt_colour

    seen = set()
    for seed in range(60):
        identity = sample_identity(np.random.default_rng(seed))
        colour = shirt_colour(make_clip(seed).reference)
        assert colour == SHIRT_COLOURS[int(np.argmax(identity.shirt))]
        seen.add(colour)
    assert seen == set(SHIRT_COLOURS)


def test_make_optimizer_follows_train_optimizer():
    from ipa_lib.core.config import TrainConfig
    from ipa_lib.stages.train import make_optimizer

    w = [torch.nn.Parameter(torch.zeros(3))]
    sgd = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1, momentum=0.5), w)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5 and sgd.defaults["lr"] == 0.1
    adam = make_optimizer(TrainConfig(), w)
    assert isinstance(adam, torch.optim.AdamW) and adam.defaults["weight_decay"] == 0.0


def test_gate_subset_keeps_one_shirt_colour(gated):
    from ipa_lib.core.io import load_npz
    from ipa_lib.data.toyworld import shirt_colour
    from ipa_lib.stages.gate import gate

    params, work = gated
    colours = [shirt_colour(r) for r in load_npz(work / "gated" / "scored.npz")["reference"]]
    colour = max(set(colours), key=colours.count)
    params.gate.subset = colour
    params.gate.min_kept = 1
    summary = gate(params, work / "samples", work / "biased", progress=False)
    kept = load_npz(work / "biased" / "kept.npz")
    assert summary["subset"] == colour and 1 <= summary["kept"] <= colours.count(colour)
    assert {shirt_colour(r) for r in kept["reference"]} == {colour}


def test_optimizer_save_at_along_and_train_poses(gated):
    from ipa_lib.stages.evaluate import evaluate
    from ipa_lib.stages.train import train

    params, work = gated
    params.train.save_at = [2, 4, 99]  # 99 > steps: ignored; the final adapter is `out` itself
    params.train.optimizer = "sgd"
    params.train.lr = 0.05
    train(params, work / "gated", work / "adapter", progress=False)
    along = sorted(p.name for p in (work / "adapter" / "along").iterdir())
    assert along == ["step-2", "step-4"]
    params.train.save_at = []
    params.train.steps = 2
    train(params, work / "gated", work / "adapter2", progress=False)  # the first two steps again
    a, b = adapter_state(work / "adapter" / "along" / "step-2"), adapter_state(work / "adapter2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    params.evaluate.along, params.evaluate.train_poses = True, 2
    result = evaluate(params, work / "adapter", work / "eval", work / "eval.json", progress=False, gated_dir=work / "gated")
    details = result["details"]
    assert set(details["along"]) == {"step-2", "step-4"}
    train_rows = json.loads((work / "eval" / "per_clip_train.json").read_text())
    kept_ids = [int(str(p).lstrip("p")) for p in np.load(work / "gated" / "kept.npz")["pose_id"]]
    assert [r["pose"] for r in train_rows if r["model"] == "base"] == list(dict.fromkeys(kept_ids))[:2]
    step2 = json.loads((work / "eval" / "along" / "step-2" / "per_clip.json").read_text())
    assert {r["model"] for r in step2} == {"ipa"} and len(step2) == params.evaluate.num_poses
    assert np.load(work / "eval" / "along" / "step-4" / "clips.npz")["ipa"].shape[:2] == (1, params.evaluate.num_poses)
    assert (work / "eval" / "along" / "step-2" / "per_clip_train.json").exists()

    params.evaluate.along, params.evaluate.train_poses = False, 50
    with pytest.raises(InputError, match="train_poses=50"):
        evaluate(params, work / "adapter", work / "eval-x", work / "eval-x.json", progress=False, gated_dir=work / "gated")
