"""The experiments that separate IPA from SFT (docs/results.md, issue 16) as DVC experiment grids.

Every cell is `dvc exp run --queue -n exp-<grid>-<label>-s<seed> -S ... evaluate` over the
project's own dvc.yaml, like the paper grid (`scripts/paper_grid.py`, whose runner helpers this
uses): the shared samples come from DVC's cache; a cell whose overrides touch the gate (a smaller
kept set, a biased subset) regates them (seconds), every cell trains and evaluates.

    python scripts/experiments.py plan  [--grids budget optimizer biased]   # cells and overrides
    python scripts/experiments.py queue [--grids ...]   # queue the cells (workspace as it is now)
    python scripts/experiments.py run   [--grids ...]   # queue, `dvc queue start -j 2`, wait, collect
    python scripts/experiments.py collect               # (re)collect finished cells
    ipa report                                          # docs/results.md, experiment sections included

Grids (each fits 90 min on 2 CPU cores, see `budget` below and docs/results.md for the times):
- budget: gated sets of 24 and 96 clips x {SFT, SFT-(1-t)^2, IPA beta=600, IPA beta=6000} x
  training seeds {0, 1}, 200 steps with the adapter at step 100 evaluated too.
- optimizer: IPA beta in {600, 6000, 60000} x {AdamW, SGD (momentum 0.9)} plus SFT and
  SFT-(1-t)^2 under both, 300 steps (`OPTIMIZER_STEPS`) with the adapter at step 100 evaluated
  too, training seed 0: 10 cells of its own (labels adamw-* / sgd-*).
- biased: a gated set of one shirt colour (`gate.subset=shirt-red`), SFT vs IPA beta=600,
  training seeds {0, 1}, 200 steps, evaluated on the usual held-out poses (every colour).

Collected cells land in `results/experiments/<cell>/` (committed, so a later checkout can add
cells and rebuild the report): cell.json (grid, label, overrides, seconds), params.yaml,
evaluate's per_clip*.json / details.json / clips.npz (base clips kept once under
`results/experiments/shared-clips/`), the
step-100 adapter's evaluation (along/step-100/), the train metrics and curve (diagnostics per
step) and the gate summary. `ipa report` renders them; the numbers it used go to
docs/results/experiments.json (committed).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_grid as grid  # noqa: E402 (the runner helpers: _sh, _env, _prepare_tracking, existing_experiments)

REPO = grid.REPO
PREFIX = "exp"
SGD_LR = 0.01  # measured: 40 steps of IPA beta=600 move the adapter 0.23 under SGD(0.01, 0.9), 0.49 under AdamW(5e-4)
BUDGET = {
    "train.steps": 200,  # the longest that fits 90 min on 2 cores with 24 cells (300 was measured to need ~110 min)
    "train.batch_size": 8,
    "train.save_at": "[100]",
    "train.checkpoint_every": 1000,
    "train.spike_factor": 1000,
    "train.log_every": 10,
    "evaluate.num_poses": 24,
    "evaluate.seeds": "[0,1]",  # two generator seeds per pose: diversity
    "evaluate.val_poses": 8,  # no cell is selected: val is only the stage's own bookkeeping
    "evaluate.train_poses": 12,  # the 24-clip set keeps 2 clips of some poses: 12 distinct ones always exist
    "evaluate.along": "true",
    "evaluate.num_inference_steps": 10,
    "tracking.experiment": "ipa-align-experiments",
}
OPTIMIZER_STEPS = 300  # the optimizer grid's budget: 10 cells of 300 steps fit 90 min on 2 cores
LOSSES = {  # label -> overrides
    "sft": {"train.loss": "sft"},
    "sft_t2": {"train.loss": "sft_t2"},
    "ipa-b600": {"train.loss": "ipa", "train.beta": "600"},
    "ipa-b6000": {"train.loss": "ipa", "train.beta": "6000"},
    "ipa-b60000": {"train.loss": "ipa", "train.beta": "60000"},
}
CELL_FILES = {  # <experiment path> -> <cell file>; the along/ ones exist when train.save_at kept an adapter
    "eval/per_clip.json": "per_clip.json",
    "eval/per_clip_train.json": "per_clip_train.json",
    "eval/details.json": "details.json",
    "eval/clips.npz": "clips.npz",
    "eval/along/step-100/per_clip.json": "along/step-100/per_clip.json",
    "eval/along/step-100/per_clip_train.json": "along/step-100/per_clip_train.json",
    "eval/along/step-100/clips.npz": "along/step-100/clips.npz",
    "metrics/eval.json": "eval.json",
    "metrics/train.json": "train.json",
    "metrics/train_curve.json": "train_curve.json",
    "data/gated/summary.json": "gate_summary.json",
    "params.yaml": "params.yaml",
}


@dataclass(frozen=True)
class Cell:
    grids: tuple[str, ...]
    label: str  # e.g. k24-sft, sgd-ipa-b600, red-sft
    seed: int
    overrides: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        return f"{PREFIX}-{self.label}-s{self.seed}"

    def args(self, extra: list[str]) -> list[str]:
        merged = {**{k: str(v) for k, v in BUDGET.items()}, **self.overrides, "train.seed": str(self.seed)}
        for item in extra:
            k, v = item.split("=", 1)
            merged[k] = v
        return [f"{k}={v}" for k, v in merged.items()]


def plan(grids: list[str]) -> list[Cell]:
    """Every cell of the named grids; a cell shared by two grids (same overrides) appears once."""
    cells: dict[str, Cell] = {}

    def add(g: str, label: str, seed: int, overrides: dict) -> None:
        c = cells.get(f"{PREFIX}-{label}-s{seed}")
        cells[f"{PREFIX}-{label}-s{seed}"] = Cell(((c.grids if c else ()) + (g,)), label, seed, overrides)

    for g in grids:
        if g == "budget":
            for k in (24, 96):
                for loss in ("sft", "sft_t2", "ipa-b600", "ipa-b6000"):
                    for s in (0, 1):
                        add(g, f"k{k}-{loss}", s, {"gate.top_k": str(k), **LOSSES[loss]})
        elif g == "optimizer":  # its own cells: the 300 steps (the budget grid runs 200)
            for loss in ("sft", "sft_t2", "ipa-b600", "ipa-b6000", "ipa-b60000"):
                base = {"gate.top_k": "96", **LOSSES[loss], "train.steps": str(OPTIMIZER_STEPS)}
                add(g, f"adamw-{loss}", 0, base)
                add(g, f"sgd-{loss}", 0, {**base, "train.optimizer": "sgd", "train.lr": str(SGD_LR)})
        elif g == "biased":
            for loss in ("sft", "ipa-b600"):
                for s in (0, 1):
                    add(g, f"red-{loss}", s, {"gate.subset": "shirt-red", **LOSSES[loss]})
        else:
            raise SystemExit(f"unknown grid {g!r}; valid: budget, optimizer, biased")
    return list(cells.values())


def exp_cmd(cell: Cell, extra: list[str]) -> list[str]:
    cmd = ["dvc", "exp", "run", "--queue", "-n", cell.name]
    for o in cell.args(extra):
        cmd += ["-S", o]
    return cmd + ["evaluate"]


def queue(cells: list[Cell], extra: list[str], repo: Path, env: dict) -> None:
    old = [n for n in grid.existing_experiments(repo, env, PREFIX) if n in {c.name for c in cells}]
    if old:
        grid._sh(["dvc", "exp", "remove", *old], repo, env)
    for cell in cells:
        grid._sh(exp_cmd(cell, extra), repo, env)


def not_run(names: list[str], exps: dict, root: Path) -> list[str]:
    """The cells with neither a finished experiment in this repo nor a collected folder under
    `root`. A cell collected by an earlier checkout (its experiment gone with that checkout's DVC
    refs) is kept as it is and counts as run."""
    return [n for n in names if n not in exps and not (root / n / "cell.json").exists()]


def collect(cells: list[Cell], root: Path, repo: Path, env: dict) -> list[str]:
    """Copy each finished cell's files from its experiment revision; returns the cells not run (`not_run`)."""
    import dvc.api

    from ipa_lib.core.io import share_arrays

    exps = grid.existing_experiments(repo, env, PREFIX)
    missing = not_run([c.name for c in cells], exps, root)
    for cell in cells:
        e = exps.get(cell.name)
        if e is None:
            continue
        folder = root / cell.name
        folder.mkdir(parents=True, exist_ok=True)
        for src, dst in CELL_FILES.items():
            try:
                with dvc.api.open(src, repo=str(repo), rev=e["rev"], mode="rb") as f:
                    data = f.read()
            except Exception as err:  # noqa: BLE001
                if not dst.startswith("along/") and dst != "per_clip_train.json":
                    raise SystemExit(f"{cell.name}: cannot read {src} at {e['rev'][:8]}: {err}") from None
                continue
            (folder / dst).parent.mkdir(parents=True, exist_ok=True)
            (folder / dst).write_bytes(data)
        train = json.loads((folder / "train.json").read_text())
        record = {"name": cell.name, "grids": list(cell.grids), "label": cell.label, "seed": cell.seed,
                  "overrides": cell.args([]), "rev": e["rev"], "timestamp": e["timestamp"],
                  "seconds": {"train": train.get("seconds")}}
        (folder / "cell.json").write_text(json.dumps(record, indent=2) + "\n")
        share_arrays(folder / "clips.npz", root / grid.SHARED_CLIPS, ("base",))  # the base clips: once per protocol
        print(f"collected {cell.name} -> {folder}", flush=True)
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["plan", "queue", "run", "collect"])
    p.add_argument("--grids", nargs="+", default=["budget", "optimizer", "biased"])
    p.add_argument("--only", nargs="+", metavar="GLOB", help="only the planned cells whose names match")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every cell")
    p.add_argument("--jobs", type=int, default=2, help="queue workers (cores split between them)")
    p.add_argument("--repo", default=str(REPO))
    p.add_argument("--cells", default=str(REPO / "results" / "experiments"), help="where collected cells go (default results/experiments, committed)")
    args = p.parse_args(argv)

    cells = plan(args.grids)
    if args.only:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.name, g) for g in args.only)]
    repo, root = Path(args.repo), Path(args.cells)
    env = grid._env(repo, args.jobs)
    if args.action == "plan":
        for c in cells:
            print(f"[{','.join(c.grids)}] " + " ".join(exp_cmd(c, args.set)))
        print(f"{len(cells)} cells", file=sys.stderr)
        return 0
    if args.action in ("queue", "run"):
        grid._prepare_tracking(args.set, repo, env)
        queue(cells, args.set, repo, env)
    if args.action == "run":
        started = time.time()
        grid.wait_queue([c.name for c in cells], repo, env, args.jobs)
        minutes = round((time.time() - started) / 60, 1)
        root.mkdir(parents=True, exist_ok=True)
        (root / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(
            {"grids": args.grids, "cells": len(cells), "jobs": args.jobs, "minutes": minutes, "finished": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")
    if args.action in ("run", "collect"):
        missing = collect(cells, root, repo, env)
        done = [json.loads((root / c.name / "cell.json").read_text()) for c in cells if (root / c.name / "cell.json").exists()]
        if done and args.action == "collect":  # what the cells' own records say (queue started by hand or by `run`)
            stamps = sorted(d["timestamp"] for d in done)
            (root / "collected.json").write_text(json.dumps(
                {"grids": args.grids, "cells": len(done), "not_run": missing, "first_finished": stamps[0], "last_finished": stamps[-1],
                 "train_minutes_total": round(sum(d["seconds"].get("train") or 0 for d in done) / 60, 1)}, indent=2) + "\n")
        if missing:
            print("neither finished nor collected before (see `dvc queue status`):\n  " + "\n  ".join(missing), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
