"""`ipa`: one CLI for DVC stages, container entrypoints and people.

Each subcommand parses arguments, loads `params.yaml` (+ `--set key=value` overrides) and
calls one library function; nothing here decides anything the library does not own.
Heavy libraries are imported inside the handlers so `ipa --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _params(args):
    from ipa_lib.core.config import load_params

    return load_params(args.params, args.set)


def tracked_stage(*args, **kwargs):
    """`ipa_lib.mlops.tracking.tracked_stage`, imported on first use (keeps `ipa --help` fast)."""
    from ipa_lib.mlops.tracking import tracked_stage as run

    return run(*args, **kwargs)


def _print(result) -> None:
    print(json.dumps(result, indent=2, sort_keys=True, default=str))


def cmd_pretrain(args) -> int:
    from ipa_lib.stages.pretrain import pretrain

    params = _params(args)
    out = args.out or params.pretrain.out
    result = tracked_stage(params, "pretrain", lambda p: pretrain(p, out, progress=not args.quiet), inputs=[], output=out)
    result.pop("log", None)
    _print(result)
    return 0


def cmd_sample(args) -> int:
    from ipa_lib.stages.sample import sample

    params = _params(args)
    out = args.out or params.sample.out
    base = args.base_model or params.backend.base_model
    result = tracked_stage(params, "sample", lambda p: sample(p, out, args.base_model, args.adapter, progress=not args.quiet),
                      inputs=[(base, "base-model")] if Path(base).exists() else [], output=out)
    _print(result)
    return 0


def cmd_gate(args) -> int:
    from ipa_lib.stages.gate import gate

    params = _params(args)
    samples, out = args.samples or params.sample.out, args.out or params.gate.out
    _print(tracked_stage(params, "gate", lambda p: gate(p, samples, out, progress=not args.quiet), inputs=[(samples, "samples")], output=out))
    return 0


def cmd_train(args) -> int:
    from ipa_lib.core.io import atomic_write_json
    from ipa_lib.stages.train import train

    params = _params(args)
    gated, out = args.gated or params.gate.out, args.out or params.train.out

    def run(p):
        result = train(p, gated, out, args.base_model, resume=args.resume, progress=not args.quiet, stop_after=args.stop_after)
        if "log" in result:
            from ipa_lib.data.visualize import plot_curve

            atomic_write_json("metrics/train_curve.json", result["log"])
            summary = {k: v for k, v in result.items() if k not in ("log", "final")}
            atomic_write_json("metrics/train.json", summary | {f"final_{k}": v for k, v in result["final"].items()})
            plot_curve(f"{out}/train_curve.png", result["log"], title=f"train[{p.train.loss}] beta={p.train.beta} lambda={p.train.hand_weight}")
        return result

    result = tracked_stage(params, "train", run, inputs=[(gated, "gated-samples")], output=out)
    result.pop("log", None)
    _print(result)
    return 0


def cmd_evaluate(args) -> int:
    from ipa_lib.stages.evaluate import evaluate

    params = _params(args)
    adapter, out = args.adapter or params.train.out, args.out or params.evaluate.out
    metrics = args.metrics or params.evaluate.metrics
    result = tracked_stage(params, "evaluate", lambda p: evaluate(p, adapter, out, metrics, args.base_model, progress=not args.quiet),
                      inputs=[(adapter, "adapter")], output=out)
    print(format_table(result))
    return 0


def cmd_show(args) -> int:
    from ipa_lib.core.io import read_json

    print(format_table(read_json(args.metrics, "evaluation metrics")))
    return 0


def format_table(result: dict) -> str:
    from ipa_lib.stages.evaluate import METRICS

    lines = [f"{'metric':<16}{'base':>10}{'ipa':>10}{'delta':>10}"]
    for m in METRICS:
        b, a = result["base"][m], result["ipa"][m]
        lines.append(f"{m:<16}{b:>10.4f}{a:>10.4f}{a - b:>+10.4f}")
    return "\n".join(lines)


def cmd_register(args) -> int:
    from ipa_lib.stages.registry_cmds import register_main

    return register_main(args.params, args.set, adapter_dir=args.adapter, metrics_path=args.metrics)


def cmd_promote(args) -> int:
    from ipa_lib.stages.registry_cmds import promote_main

    return promote_main(args.params, args.candidate, args.dry_run, args.to_version, overrides=args.set)


def cmd_hands_detect(args) -> int:
    from ipa_lib.data.hands.detect_cli import detect_main

    return detect_main(args.paths, args.json, args.model)


def cmd_cluster_preflight(args) -> int:
    from ipa_lib.orchestration.cluster import preflight_main

    return preflight_main(args.params, args.context)


def cmd_smoke(args) -> int:
    from ipa_lib.stages.smoke import smoke_main

    return smoke_main(args.backend)


def cmd_report(args) -> int:
    from ipa_lib.analysis.report import add_arguments, report_main

    parser = add_arguments(argparse.ArgumentParser(prog="ipa report", description="the method x beta table, curves and claims"))
    return report_main(parser.parse_args(args.extra))


def cmd_pipeline(args) -> int:
    from ipa_lib.orchestration import kfp as kfp_cli

    return kfp_cli.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipa", description="Implicit Preference Alignment for pose-driven human image animation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param, e.g. train.beta=200")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=fn)
        return p

    p = stage("pretrain", cmd_pretrain, "pretrain the toy base animator")
    p.add_argument("--out")
    p = stage("sample", cmd_sample, "sample clips from the current model")
    p.add_argument("--out"), p.add_argument("--base-model"), p.add_argument("--adapter", help="adapter folder or models:/ URI")
    p = stage("gate", cmd_gate, "score hands, validate, keep the best samples")
    p.add_argument("--samples"), p.add_argument("--out")
    p = stage("train", cmd_train, "LoRA alignment (IPA or a baseline) on the gated samples")
    p.add_argument("--gated"), p.add_argument("--out"), p.add_argument("--base-model")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--stop-after", type=int, help="stop after N steps, keeping checkpoints (for tests/ops)")
    p = stage("evaluate", cmd_evaluate, "base vs aligned on held-out poses")
    p.add_argument("--adapter"), p.add_argument("--out"), p.add_argument("--metrics"), p.add_argument("--base-model")
    p = sub.add_parser("show", help="print the base vs aligned table from metrics/eval.json")
    p.add_argument("--metrics", default="metrics/eval.json")
    p.set_defaults(func=cmd_show)
    p = stage("register", cmd_register, "log the aligned model to MLflow and register a version")
    p.add_argument("--adapter"), p.add_argument("--metrics")
    p = stage("promote", cmd_promote, "move the champion alias if the candidate is measurably better")
    p.add_argument("--candidate", type=int), p.add_argument("--to-version", type=int, help="roll back: point the alias at version N")
    p.add_argument("--dry-run", action="store_true")
    p = stage("smoke", cmd_smoke, "build a tiny backend, generate, train a few steps, round-trip adapters")
    p.add_argument("--backend", default="wan-animate", choices=["toy", "wan-animate"])

    # report parses its own options (ipa report --help): its module needs numpy at import
    p = sub.add_parser("report", help="the method x beta table, curves and claims -> docs/results.md", add_help=False)
    p.set_defaults(func=cmd_report)

    hands = sub.add_parser("hands", help="hand detection on images and videos").add_subparsers(dest="hands_cmd", required=True)
    p = hands.add_parser("detect", help="run the MediaPipe hand landmarker")
    p.add_argument("paths", nargs="+"), p.add_argument("--json", action="store_true"), p.add_argument("--model")
    p.set_defaults(func=cmd_hands_detect)

    cluster = sub.add_parser("cluster", help="Kubernetes cluster checks").add_subparsers(dest="cluster_cmd", required=True)
    p = cluster.add_parser("preflight", help="check what a pipeline run needs in the cluster")
    p.add_argument("--params", default="params.yaml"), p.add_argument("--context")
    p.set_defaults(func=cmd_cluster_preflight)

    pipeline = sub.add_parser("pipeline", help="Kubeflow Pipelines: compile, submit, run locally")
    pipeline.add_argument("--params", default="params.yaml")
    pipeline.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    psub = pipeline.add_subparsers(dest="pipeline_cmd", required=True)
    p = psub.add_parser("compile", help="write the pipeline IR YAML")
    p.add_argument("--out", default="pipelines/ipa_round.yaml")
    p = psub.add_parser("submit", help="submit a run through kfp.Client")
    p.add_argument("--host", required=True), p.add_argument("--experiment", default=None)
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="pipeline parameter override")
    p.add_argument("--package", default="pipelines/ipa_round.yaml")
    p = psub.add_parser("run-local", help="run the DAG with kfp.local (SubprocessRunner)")
    p.add_argument("--workdir", default=".ipa/kfp-local")
    pipeline.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "report":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    from ipa_lib.core.errors import exit_code

    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:  # one policy for every command: ipa_lib.core.errors
        code = exit_code(err)
        if code is None:
            raise
        print("interrupted" if isinstance(err, KeyboardInterrupt) else f"error: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
