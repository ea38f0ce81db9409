"""Scaling benchmark: sampling throughput (clips/s) with 1 and 2 worker processes. Writes JSON.

Each worker is a spawned process, like the `sample.workers` pool of `ipa sample`
(`ipa_lib.stages.sample._sample_todo`): it loads its own backend, draws a warm-up clip, waits
at a barrier with the other workers, then animates its share of the clips with
`ipa_lib.models.generate.generate_clips` (what `sample_shard` runs per clip), one torch thread
per worker. Strong scaling: the same total clip count, dealt round-robin like shards.
Throughput = clips / (last worker's end - first worker's start after the barrier);
efficiency = throughput(2) / (2 x throughput(1)); goal >= 0.9 where the cores are free.

Models: `toy` = the committed toy base (models/base, 5x32x32 clips, `sample.num_inference_steps`
steps); `wan-tiny` = the tiny random Wan-Animate pipeline of `ipa_lib.models.wan_tiny`
(17x32x32 clips). Runs alternate 1, 2, 1, 2, ... workers (load drift hits both alike); the
median of `--repeats` runs is reported, with every run's numbers.

Memory: each worker's peak resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, imports
and model included). Load: `os.getloadavg()` before and after each run; on a shared machine
read the efficiency next to it (a load above the core count means the workers shared cores).

Train (`--train`): `ipa_lib.stages.train.train_in_pod` with 1 and 2 processes (2 = `accelerate
launch`, gloo on CPU, DDP) on the toy base, on a gated set made by the real sample and gate
stages; time = the run's own loop seconds (`train_summary.json`: model load and process start
excluded). Strong scaling: the same global batch on 1 and 2 processes (efficiency = t1 / (2 t2));
weak scaling: the same per-process batch (global batch doubles; efficiency = t1 / t2).

Reproduce:
    OMP_NUM_THREADS=1 python benchmarks/scaling.py --train --out benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _conditions(model: str, count: int) -> tuple[dict, int]:
    """(reference, pose) uint8 arrays of `count` clips, and the inference step count."""
    import numpy as np
    import torch

    if model == "toy":
        from ipa_lib.core.config import load_params
        from ipa_lib.data.toyworld import toy_conditions

        params = load_params(ROOT / "params.yaml")
        t = params.toy
        c = toy_conditions(0, count, t.frames, t.size, t.motion)
        return {"reference": c["reference"], "pose": c["pose"]}, params.sample.num_inference_steps
    from ipa_lib.models.wan_tiny import TINY_FRAMES, TINY_SIZE, tiny_batch

    b = tiny_batch(count, TINY_FRAMES, TINY_SIZE, seed=0)

    def u8(x):  # [-1, 1] channels first -> uint8 channels last
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return np.ascontiguousarray(x.movedim(1, -1).numpy())

    return {"reference": u8(b["reference"]), "pose": u8(b["pose"])}, 4


def _backend(model: str):
    if model == "toy":
        from ipa_lib.models.toy import ToyBackend

        return ToyBackend.from_pretrained(ROOT / "models" / "base")
    from ipa_lib.core.config import BackendConfig
    from ipa_lib.models.wan_animate import WanAnimateBackend

    return WanAnimateBackend.tiny(BackendConfig(name="wan-animate", device="cpu", dtype="float32"))


def worker(model: str, seeds: list[int], steps: int | None, barrier, queue) -> None:
    """One sampling process: load, warm up, wait for the others, time its clips."""
    import resource

    import torch

    torch.set_num_threads(1)
    from ipa_lib.models.generate import generate_clips

    backend = _backend(model)
    cond, default_steps = _conditions(model, max(seeds) + 1)
    steps = steps or default_steps
    generate_clips(backend, cond["reference"][:1], cond["pose"][:1], [0], steps, 1, progress=False)  # warm-up
    barrier.wait()
    t0 = time.time()
    idx = list(seeds)
    generate_clips(backend, cond["reference"][idx], cond["pose"][idx], seeds, steps, len(idx), progress=False)
    t1 = time.time()
    queue.put({"clips": len(seeds), "start": t0, "end": t1, "steps": steps,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


def run_once(model: str, workers: int, clips: int, steps: int | None) -> dict:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    load_before = [round(x, 2) for x in os.getloadavg()]
    wall0 = time.time()
    procs = [ctx.Process(target=worker, args=(model, list(range(w, clips, workers)), steps, barrier, queue))
             for w in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{model}: a sampling worker exited with {p.exitcode}")
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "workers": workers, "clips": clips, "seconds": round(seconds, 3),
        "clips_per_s": round(clips / seconds, 4), "wall_s_with_startup": round(time.time() - wall0, 2),
        "worker_seconds": [round(r["end"] - r["start"], 3) for r in results],
        "peak_rss_mb_per_worker": [r["peak_rss_mb"] for r in results],
        "inference_steps": results[0]["steps"],
        "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def bench(model: str, clips: int, repeats: int, steps: int | None) -> dict:
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(repeats):
        for w in (1, 2):
            r = run_once(model, w, clips, steps)
            runs[w].append(r)
            print(f"  {model} workers={w}: {r['clips_per_s']:.3f} clips/s ({r['seconds']:.1f} s), "
                  f"load {r['loadavg_before']} -> {r['loadavg_after']}", flush=True)
    thr = {w: statistics.median(r["clips_per_s"] for r in rs) for w, rs in runs.items()}
    return {
        "model": model, "clips": clips, "inference_steps": runs[1][0]["inference_steps"],
        "throughput_clips_per_s": {str(w): round(v, 4) for w, v in thr.items()},
        "speedup": round(thr[2] / thr[1], 3),
        "efficiency": round(thr[2] / (2 * thr[1]), 3),
        "peak_rss_mb_per_worker": max(x for rs in runs.values() for r in rs for x in r["peak_rss_mb_per_worker"]),
        "runs": {str(w): rs for w, rs in runs.items()},
    }


def _train_runs(steps: int, batch: int) -> dict:
    """Strong and weak scaling of the training step, 1 vs 2 processes (see the module doc)."""
    import tempfile

    from ipa_lib.core.config import load_params
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample
    from ipa_lib.stages.train import train_in_pod

    overrides = ["tracking.enabled=false", "backend.device=cpu", f"backend.base_model={ROOT / 'models' / 'base'}",
                 f"sample.num_clips={2 * batch}", "sample.num_inference_steps=2", f"sample.batch_size={2 * batch}",
                 "gate.threshold=0.0", f"gate.top_k={2 * batch}", "gate.min_kept=1",
                 f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.log_every={steps}"]
    params = load_params(ROOT / "params.yaml", overrides)
    runs = []
    with tempfile.TemporaryDirectory(prefix="ipa-scaling-") as tmp:
        sample(params, f"{tmp}/samples", progress=False)
        gate(params, f"{tmp}/samples", f"{tmp}/gated", progress=False)
        for procs, global_batch in ((1, batch), (2, batch), (1, batch // 2)):
            params.train.batch_size = global_batch
            load_before = [round(x, 2) for x in os.getloadavg()]
            wall0 = time.time()
            res = train_in_pod(params, f"{tmp}/gated", f"{tmp}/adapter-{procs}-{global_batch}", processes=procs,
                               resume=False, progress=False)
            runs.append({"processes": procs, "global_batch": global_batch, "per_process_batch": global_batch // procs,
                         "steps": steps, "loop_seconds": res["seconds"], "step_s": round(res["seconds"] / steps, 3),
                         "wall_s_with_startup": round(time.time() - wall0, 1), "final_loss": res["final"].get("loss"),
                         "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()]})
            print(f"  train processes={procs} batch={global_batch}: {runs[-1]['step_s']} s/step, "
                  f"load {load_before} -> {runs[-1]['loadavg_after']}", flush=True)
    t1, t2, t1_half = (r["loop_seconds"] for r in runs)
    return {"measured": True, "model": "toy (models/base)", "runs": runs,
            "strong": {"global_batch": batch, "speedup": round(t1 / t2, 3), "efficiency": round(t1 / (2 * t2), 3)},
            "weak": {"per_process_batch": batch // 2, "efficiency": round(t1_half / t2, 3)}}


def machine() -> dict:
    import torch

    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "affinity_cores": len(os.sched_getaffinity(0))}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["toy", "wan-tiny"], choices=["toy", "wan-tiny"])
    ap.add_argument("--clips", type=int, nargs="+", default=None,
                    help="total clips per run, one per model (default: toy 16, wan-tiny 24)")
    ap.add_argument("--steps", type=int, default=None,
                    help="inference steps (default: toy sample.num_inference_steps of params.yaml, wan-tiny 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train", action="store_true", help="also time training with 1 and 2 processes")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--train-batch", type=int, default=8, help="global batch of the strong-scaling runs (even)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    clips = dict(zip(args.models, args.clips or [{"toy": 16, "wan-tiny": 24}[m] for m in args.models]))
    start = time.time()
    report = {
        "benchmark": "scaling",
        "command": "python benchmarks/scaling.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "settings": {"repeats": args.repeats, "threads_per_worker": 1, "start_method": "spawn",
                     "timing": "clips / (last end - first start) after a barrier; model load and warm-up excluded",
                     "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "sampling": [],
        "train": {"measured": False, "why": "run without --train"},
    }
    for model in args.models:
        print(f"{model}: {clips[model]} clips", flush=True)
        report["sampling"].append(bench(model, clips[model], args.repeats, args.steps))
    if args.train:
        print("train: 1 and 2 processes", flush=True)
        report["train"] = _train_runs(args.train_steps, args.train_batch)
    report["settings"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.time() - start, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    for r in report["sampling"]:
        print(r["model"], json.dumps(r["throughput_clips_per_s"]), "efficiency", r["efficiency"])
    if report["train"]["measured"]:
        print("train strong", json.dumps(report["train"]["strong"]), "weak", json.dumps(report["train"]["weak"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
