"""The miniature paper grid as DVC experiments: methods x beta x seeds on one gated set.

Every cell is `dvc exp run -S train.loss=... -S train.beta=... -S train.hand_weight=...
-S train.seed=... evaluate` over the project's own dvc.yaml (no copied stage definitions):
sample and gate are unchanged by those overrides, so every cell reuses the one gated set
(checked out from the DVC cache / run cache) and only train + evaluate run. The grid's
budget (steps, evaluation size) is a handful of further `-S` overrides shared by all cells.

    python scripts/paper_grid.py run                 # queue every cell, run the queue, collect
    python scripts/paper_grid.py run --runner temp   # one `dvc exp run --temp` after another
    python scripts/paper_grid.py collect             # (re)collect finished experiments
    python scripts/paper_grid.py plan                # print the cells and their overrides
    ipa report                                       # docs/results.md from the collected cells

Runners:
- queue (default): `dvc exp run --queue` per cell, then `dvc queue start -j 2` and wait: two
  workers with one thread each keep both cores busy (one cell's process start-up, DVC and
  MLflow bookkeeping overlap the other's training; MLflow's SQLite store waits on its lock).
  Each cell runs in a temporary copy of the committed repo (commit before running).
- temp: the same experiments run one by one with `dvc exp run --temp` (no celery worker),
  which also times each cell exactly.
- inline: no DVC; the library functions in this process (the test suite's reduced grid).

Collected cells land in `results/paper/round-<r>/<name>/` (committed, so the report can be
rebuilt and extended in a later checkout): cell.json, params.yaml, evaluate's
per_clip.json/details.json/clips.npz (the base clips, identical in every cell, kept once under
`results/paper/shared-clips/`), train.json, and the adapter (git-ignored: about 1 MB per cell;
round 2 samples from it, so round 2 runs in the checkout that collected round 1). MLflow: every
stage of every cell is logged to the main store (the queue's temporary copies get
`MLFLOW_TRACKING_URI` pointing at `<repo>/.ipa/mlflow.db`) in the experiment `ipa-align-paper`.

Round 2 (`--round 2`): each (method, beta, seed) samples again from its own round-1 adapter
(`-S backend.init_adapter=...`), is gated, and trains a fresh adapter on the new samples.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "paper"
# method -> (train.loss, train.hand_weight, uses beta)
METHODS = {
    "sft": ("sft", 10.0, False),
    "ipa-global": ("ipa", 1.0, True),
    "ipa-hand": ("ipa", 10.0, True),
    "dpo": ("dpo", 10.0, True),
    "kto": ("kto", 10.0, True),
}
# equal compute per step: a DPO item is a pair (winner + loser, two clips through the policy and
# the reference), so DPO's batch is half the grid's batch in pairs (see cell_overrides)
PAIRED_METHODS = ("dpo",)
BETAS = (200.0, 600.0, 2000.0)
SEEDS = (0, 1, 2)
# the grid's budget on 2 CPU cores (see docs/results.md "Setup" and README "Paper table")
BUDGET = {
    "train.steps": 100,
    "train.batch_size": 8,
    "train.checkpoint_every": 1000,  # no intermediate checkpoints: a cell is cheap to redo
    # only NaN/inf stop a cell: a one-batch loss outlier is the method's behaviour to measure, not a
    # crash (saturated DPO sits at a median loss of 1e-6 and swings back to 1.2-3.7 at step 78: any
    # finite factor stops it; 1000 stopped 5 of the 9 DPO cells). The rule only stops training, so
    # a cell that never trips it trains identically under any factor.
    "train.spike_factor": 1e30,
    "train.log_every": 10,
    "evaluate.num_poses": 24,
    "evaluate.val_poses": 24,
    "evaluate.seeds": "[0]",
    "evaluate.num_inference_steps": 10,
    "tracking.experiment": "ipa-align-paper",
}
CELL_FILES = {  # what a cell keeps: <experiment path> -> <cell file>
    "eval/per_clip.json": "per_clip.json",
    "eval/details.json": "details.json",
    "eval/clips.npz": "clips.npz",
    "metrics/eval.json": "eval.json",
    "metrics/train.json": "train.json",
    "params.yaml": "params.yaml",
}
ADAPTER_FILES = ("pytorch_lora_weights.safetensors", "train_summary.json", "adapter_config.json")
CELLS = REPO / "results" / "paper"  # committed: `ipa report` rebuilds docs/results.md from them in any later checkout
SHARED_CLIPS = "shared-clips"  # <cells>/shared-clips/<sha>.npz: arrays many cells share (`ipa_lib.core.io.share_arrays`)


@dataclass(frozen=True)
class CellSpec:
    method: str
    beta: float | None
    seed: int
    round: int = 1
    init_adapter: str | None = None  # round >= 2: sample from this adapter

    @property
    def name(self) -> str:
        beta = f"-b{self.beta:g}" if self.beta is not None else ""
        return f"{PREFIX}-r{self.round}-{self.method}{beta}-s{self.seed}"

    @property
    def loss(self) -> str:
        return METHODS[self.method][0]

    @property
    def hand_weight(self) -> float:
        return METHODS[self.method][1]

    def overrides(self) -> list[str]:
        beta = self.beta if self.beta is not None else 600.0  # SFT ignores beta; keep the default
        out = [f"train.loss={self.loss}", f"train.beta={beta:g}", f"train.hand_weight={self.hand_weight:g}", f"train.seed={self.seed}"]
        if self.init_adapter:
            out.append(f"backend.init_adapter={self.init_adapter}")
        return out


def plan(methods=tuple(METHODS), betas=BETAS, seeds=SEEDS, round_: int = 1, init_adapters: dict | None = None) -> list[CellSpec]:
    """Every cell of the grid: methods without beta once per seed, the others per beta and seed."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    cells = []
    for m in methods:
        for b in (betas if METHODS[m][2] else (None,)):
            for s in seeds:
                spec = CellSpec(m, float(b) if b is not None else None, int(s), round_)
                if round_ > 1:
                    key = CellSpec(m, spec.beta, spec.seed, round_ - 1).name
                    if not init_adapters or key not in init_adapters:
                        raise SystemExit(f"round {round_}: no collected round-{round_ - 1} adapter for {key}; run and collect round {round_ - 1} first")
                    spec = CellSpec(m, spec.beta, spec.seed, round_, init_adapters[key])
                cells.append(spec)
    return cells


def cell_overrides(spec: CellSpec, common: list[str]) -> list[str]:
    """The grid's shared overrides + the cell's own (the cell wins), with a paired method's
    batch halved so every method pushes the same number of clips through per step."""
    merged = dict(o.split("=", 1) for o in common + spec.overrides())
    if spec.method in PAIRED_METHODS and "train.batch_size" in merged:
        merged["train.batch_size"] = str(max(1, int(merged["train.batch_size"]) // 2))
    return [f"{k}={v}" for k, v in merged.items()]


def budget_overrides(budget: dict, extra: list[str]) -> list[str]:
    out = {k: str(v) for k, v in budget.items()}
    for item in extra:
        k, v = item.split("=", 1)
        out[k] = v
    return [f"{k}={v}" for k, v in out.items()]


# ---- cells on disk ------------------------------------------------------------------------------

def write_cell(root: Path, spec: CellSpec, files: dict[str, bytes], seconds: dict, source: str, extra: dict | None = None) -> Path:
    """One collected cell folder: cell.json + the files (bytes by cell file name)."""
    folder = root / f"round-{spec.round}" / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "adapter").mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    record = {"name": spec.name, "round": spec.round, "method": spec.method, "loss": spec.loss,
              "beta": spec.beta if spec.beta is not None else 600.0, "hand_weight": spec.hand_weight, "seed": spec.seed,
              "init_adapter": spec.init_adapter, "source": source, "seconds": seconds, **(extra or {})}
    if "train.json" in files:
        train = json.loads(files["train.json"])
        record["steps"] = train.get("steps")
        record["train_final"] = {k[len("final_"):]: v for k, v in train.items() if k.startswith("final_")}
        seconds.setdefault("train", train.get("seconds"))
    (folder / "cell.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if (folder / "clips.npz").exists():  # the base clips are the same in every cell: kept once (committed cells stay small)
        from ipa_lib.core.io import share_arrays

        share_arrays(folder / "clips.npz", root / SHARED_CLIPS, ("base",))
    return folder


def collected_adapters(root: Path, round_: int) -> dict[str, str]:
    return {p.parent.name: str(p.resolve()) for p in (root / f"round-{round_}").glob("*/adapter")
            if (p / "pytorch_lora_weights.safetensors").exists()}


# ---- DVC runners -----------------------------------------------------------------------------------

def _sh(cmd: list[str], repo: Path, env: dict | None = None, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=repo, env=env, check=check, text=True, capture_output=capture)


def _env(repo: Path, jobs: int = 1) -> dict:
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 2) // jobs))  # cores split between workers
    env = {**os.environ, "OMP_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
    # temporary experiment copies would otherwise open their own store under their own .ipa/
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(repo / '.ipa' / 'mlflow.db').resolve()}")
    return env


def _prepare_tracking(common: list[str], repo: Path, env: dict) -> None:
    """Create the grid's MLflow experiment from the main repo, so its artifacts land in <repo>/.ipa."""
    sys.path.insert(0, str(REPO))
    from ipa_lib.core.config import load_params
    from ipa_lib.mlops.tracking import configure

    params = load_params(repo / "params.yaml", common)
    if params.tracking.enabled:
        os.environ.setdefault("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        configure(params, repo)


def exp_cmd(spec: CellSpec, common: list[str], mode: str) -> list[str]:
    """`dvc exp run` for one cell; stops after evaluate (grid cells are not registry candidates)."""
    cmd = ["dvc", "exp", "run", f"--{mode}", "-n", spec.name]
    for o in cell_overrides(spec, common):
        cmd += ["-S", o]
    return cmd + ["evaluate"]


def existing_experiments(repo: Path, env: dict, prefix: str = PREFIX) -> dict[str, dict]:
    """{name: {"rev", "timestamp", "params", "metrics"}} of the experiments named `<prefix>-...`,
    from `dvc exp show --json`."""
    r = _sh(["dvc", "exp", "show", "--json", "-A"], repo, env, capture=True)
    out = {}

    def walk(nodes):
        for node in nodes or []:
            for e in node.get("experiments") or []:
                # queued / running / failed tasks are listed too, at their stash revision (the
                # workspace they were queued from): only finished experiments carry their outputs
                if ((e.get("executor") or {}).get("state") or "success") != "success":
                    continue
                for rev in e.get("revs") or []:
                    data = rev.get("data") or {}
                    name = rev.get("name") or e.get("name")
                    if name and name.startswith(prefix + "-") and not rev.get("error"):
                        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data", {})
                        metrics = {k: v.get("data") for k, v in (data.get("metrics") or {}).items()}
                        prev = out.get(name)
                        if prev is None or (data.get("timestamp") or "") > prev["timestamp"]:
                            out[name] = {"rev": rev["rev"], "timestamp": data.get("timestamp") or "", "params": params, "metrics": metrics}

    walk(json.loads(r.stdout))
    return out


def queue_state(status: str, names: list[str]) -> tuple[int, int, int]:
    """(queued, running, workers) of `dvc queue status` output, counting only the tasks named `names`."""
    tasks = [line.split() for line in status.splitlines()]
    mine = [t for t in tasks if len(t) >= 2 and t[1] in names]
    queued = sum("Queued" in t for t in mine)
    running = sum("Running" in t for t in mine)
    m = re.search(r"Worker status:\s*(\d+) active,\s*(\d+) idle", status)
    return queued, running, (int(m.group(1)) + int(m.group(2))) if m else 0


def wait_queue(names: list[str], repo: Path, env: dict, jobs: int, poll: float = 15.0) -> None:
    """`dvc queue start -j jobs`, then wait until none of `names` is queued or running.

    A DVC queue worker can exit while tasks are still queued (seen here: two tasks running
    under "1 active" worker, and after one finished the queued ones waited for the other); so
    whenever tasks wait while fewer than `jobs` run and fewer than `jobs` workers are alive, the
    queue is started again, which only tops it up to `jobs` workers."""
    _sh(["dvc", "queue", "start", "-j", str(jobs)], repo, env)
    while True:
        time.sleep(poll)
        status = _sh(["dvc", "queue", "status"], repo, env, capture=True, check=False).stdout
        queued, running, workers = queue_state(status, names)
        if not queued and not running:
            return
        if queued and running < jobs and workers < jobs:
            print(f"{queued} cells queued with {workers} of {jobs} workers: starting the queue again", flush=True)
            _sh(["dvc", "queue", "start", "-j", str(jobs)], repo, env)


def run_dvc(specs: list[CellSpec], common: list[str], runner: str, cells_root: Path, repo: Path = REPO, jobs: int = 1) -> dict:
    """Run the cells as DVC experiments and collect them; returns timings and failed cells."""
    env = _env(repo, jobs)
    _prepare_tracking(common, repo, env)
    started = time.time()
    _sh(["dvc", "repro", "gate"], repo, env)  # the shared samples + gated set, once (cached if unchanged)
    timing = {"sample_gate_seconds": round(time.time() - started, 1), "failed": []}
    print(f"shared sample+gate ready in {timing['sample_gate_seconds']:.0f} s", flush=True)
    names = [s.name for s in specs]
    old = [n for n in existing_experiments(repo, env) if n in names]
    if old:
        _sh(["dvc", "exp", "remove", *old], repo, env)
    seconds: dict[str, dict] = {}
    if runner == "temp":
        for spec in specs:
            t0 = time.time()
            _sh(exp_cmd(spec, common, "temp"), repo, env)
            seconds[spec.name] = {"total": round(time.time() - t0, 1)}
            collect(cells_root, repo, env, {spec.name: spec}, seconds)
        return timing
    for spec in specs:
        _sh(exp_cmd(spec, common, "queue"), repo, env)
    t0 = time.time()
    wait_queue(names, repo, env, jobs)
    timing["queue_minutes"] = round((time.time() - t0) / 60, 1)
    print(f"queue done in {timing['queue_minutes']:.1f} min", flush=True)
    # failed = no successful experiment of that name since this queue started (`dvc queue status`
    # also lists failed tasks of earlier invocations under the same names)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0))
    done = existing_experiments(repo, env)
    timing["failed"] = [n for n in names if n not in done or done[n]["timestamp"][:19] < since]
    if timing["failed"]:
        print("failed cells (see `dvc queue status` / `dvc queue logs <task>`; rerun them with --only NAME...):\n  "
              + "\n  ".join(timing["failed"]), file=sys.stderr)
    collect(cells_root, repo, env, {s.name: s for s in specs}, None, started_at=t0 if jobs == 1 else None, exps=done)
    return timing


def _spec_from_params(name: str, params: dict) -> CellSpec:
    tr = params.get("train", {})
    loss, hw = tr.get("loss", "ipa"), float(tr.get("hand_weight", 10.0))
    method = next(m for m, (l, h, _) in METHODS.items() if l == loss and (loss != "ipa" or h == hw))
    rnd = int(name.split("-r", 1)[1].split("-", 1)[0]) if "-r" in name else 1
    beta = float(tr.get("beta", 600.0)) if METHODS[method][2] else None
    return CellSpec(method, beta, int(tr.get("seed", 0)), rnd, (params.get("backend") or {}).get("init_adapter"))


def collect(cells_root: Path, repo: Path = REPO, env: dict | None = None, only: dict[str, CellSpec] | None = None,
            seconds: dict[str, dict] | None = None, started_at: float | None = None, exps: dict[str, dict] | None = None) -> list[Path]:
    """Copy every finished grid experiment's outputs into `cells_root` (via dvc.api at its revision);
    `exps`: `existing_experiments(...)` when the caller already has it (one `dvc exp show` less)."""
    import dvc.api

    env = env or _env(repo)
    exps = existing_experiments(repo, env) if exps is None else exps
    if only is not None:
        exps = {n: e for n, e in exps.items() if n in only}
    # queue mode: cells ran one after another, so the time between commits is a cell's wall time
    order = sorted(exps.items(), key=lambda kv: kv[1]["timestamp"])
    stamps = {n: time.mktime(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S")) for n, e in order if e["timestamp"]}
    written = []
    for i, (name, e) in enumerate(order):
        files = {}
        for src, dst in CELL_FILES.items():
            try:
                with dvc.api.open(src, repo=str(repo), rev=e["rev"], mode="rb") as f:
                    files[dst] = f.read()
            except Exception as err:  # noqa: BLE001 (clips.npz is optional: older evaluate stages did not write it)
                if dst not in ("clips.npz", "train.json"):
                    raise SystemExit(f"{name}: cannot read {src} at {e['rev'][:8]}: {err}") from None
        spec = only[name] if only and name in only else _spec_from_params(name, e["params"])
        secs = dict((seconds or {}).get(name, {}))
        if "total" not in secs and name in stamps and started_at is not None:
            previous = stamps.get(order[i - 1][0]) if i > 0 else started_at
            if previous is not None:
                secs["total"] = round(stamps[name] - max(previous, started_at), 1)
        folder = write_cell(cells_root, spec, files, secs, f"dvc:{e['rev']}", {"experiment": name})
        for fname in ADAPTER_FILES:
            try:
                with dvc.api.open(f"models/adapter/{fname}", repo=str(repo), rev=e["rev"], mode="rb") as f:
                    (folder / "adapter" / fname).write_bytes(f.read())
            except Exception:  # noqa: BLE001
                pass
        written.append(folder)
        print(f"collected {name} -> {folder}", flush=True)
    return written


# ---- inline runner (no DVC; the reduced grid in the test suite) ---------------------------------------------

def run_inline(specs: list[CellSpec], params_path: str | Path, common: list[str], work: Path, cells_root: Path,
               progress: bool = False) -> list[Path]:
    """The same cells with the library functions in this process: one shared sample+gate, then
    train + evaluate per cell, written in the collected-cell layout."""
    import yaml

    sys.path.insert(0, str(REPO))
    from ipa_lib.core.config import load_params
    from ipa_lib.stages.evaluate import evaluate
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample
    from ipa_lib.stages.train import train

    work = Path(work)
    gated: dict[str | None, Path] = {}
    written = []
    for spec in specs:
        params = load_params(params_path, cell_overrides(spec, common))
        if spec.init_adapter not in gated:  # one sample + gate per starting model
            tag = "base" if spec.init_adapter is None else Path(spec.init_adapter).parent.name
            t0 = time.time()
            sample(params, work / f"samples-{tag}", adapter=spec.init_adapter, progress=progress)
            gate(params, work / f"samples-{tag}", work / f"gated-{tag}", progress=progress)
            gated[spec.init_adapter] = work / f"gated-{tag}"
            print(f"sample+gate ({tag}): {time.time() - t0:.1f} s", flush=True)
        cell_dir = work / spec.name
        t0 = time.time()
        train(params, gated[spec.init_adapter], cell_dir / "adapter", progress=progress,
              metrics_path=cell_dir / "train.json", curve_path=cell_dir / "train_curve.json")
        t1 = time.time()
        evaluate(params, cell_dir / "adapter", cell_dir / "eval", cell_dir / "eval.json", progress=progress)
        t2 = time.time()
        files = {dst: (cell_dir / "eval" / Path(src).name).read_bytes() for src, dst in CELL_FILES.items()
                 if src.startswith("eval/") and (cell_dir / "eval" / Path(src).name).exists()}
        files["eval.json"] = (cell_dir / "eval.json").read_bytes()
        files["train.json"] = (cell_dir / "train.json").read_bytes()  # written by the train stage
        files["params.yaml"] = yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False).encode()
        folder = write_cell(cells_root, spec, files, {"train": round(t1 - t0, 1), "evaluate": round(t2 - t1, 1), "total": round(t2 - t0, 1)}, "inline")
        for f in (cell_dir / "adapter").iterdir():
            if f.is_file():
                shutil.copy(f, folder / "adapter" / f.name)
        written.append(folder)
        print(f"{spec.name}: train {t1 - t0:.1f} s, evaluate {t2 - t1:.1f} s", flush=True)
    return written


# ---- command line ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["plan", "run", "collect"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--betas", nargs="+", type=float, default=list(BETAS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--round", type=int, default=1, help="2 = sample again from each round-1 adapter")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only the planned cells matching these names/globs (e.g. rerun failed ones)")
    p.add_argument("--runner", choices=["queue", "temp", "inline"], default="queue")
    p.add_argument("--jobs", type=int, default=2, help="queue workers, each with cores/jobs threads (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every cell (wins over the budget)")
    p.add_argument("--params", default=str(REPO / "params.yaml"), help="params file (inline runner)")
    p.add_argument("--repo", default=str(REPO), help="the DVC repository the experiments run in")
    p.add_argument("--cells", default=str(CELLS), help="where collected cells go (default results/paper, committed; adapters git-ignored)")
    p.add_argument("--work", default=str(REPO / ".ipa" / "paper-work"), help="scratch folder (inline runner)")
    args = p.parse_args(argv)

    cells_root = Path(args.cells)
    common = budget_overrides(BUDGET, args.set)
    adapters = collected_adapters(cells_root, args.round - 1) if args.round > 1 else None
    if args.action == "collect":
        collect(cells_root, Path(args.repo))
        return 0
    specs = plan(args.methods, args.betas, args.seeds, args.round, adapters)
    if args.only:
        import fnmatch

        specs = [s for s in specs if any(fnmatch.fnmatch(s.name, pat) for pat in args.only)]
        if not specs:
            raise SystemExit(f"--only {' '.join(args.only)}: matches no planned cell (see `plan`)")
    if args.action == "plan":
        for s in specs:
            print(" ".join(exp_cmd(s, common, "queue")))
        print(f"{len(specs)} cells", file=sys.stderr)
        return 0
    started = time.time()
    timing = {}
    if args.runner == "inline":
        run_inline(specs, args.params, common, Path(args.work), cells_root, progress=False)
    else:
        timing = run_dvc(specs, common, args.runner, cells_root, Path(args.repo), args.jobs)
    minutes = (time.time() - started) / 60
    record = {"round": args.round, "runner": args.runner, "jobs": args.jobs, "cells": len(specs), "minutes": round(minutes, 1),
              "cpu_cores": os.cpu_count(), "overrides": common, "finished": time.strftime("%Y-%m-%d %H:%M"), **timing}
    # one record per invocation (a rerun of failed cells adds one; the report lists them all)
    (cells_root / f"grid-round-{args.round}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"grid: {len(specs)} cells in {minutes:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
