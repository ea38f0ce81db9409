"""`ipa`: one CLI for DVC stages, container entrypoints and people.

Each subcommand parses arguments, loads `params.yaml` (+ `--set key=value` overrides) and
calls one library function; nothing here decides anything the library does not own.
Command groups live in their own modules: `stages` (pretrain ... promote), `hands`,
`cluster`, `report`; `ipa pipeline` drives `ipa_lib.orchestration.kfp`. Errors follow one
policy for every command, `ipa_lib.core.errors.exit_code` (bad input 2, failure 1).
Heavy libraries are imported inside the handlers so `ipa --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys


def cmd_cluster_preflight(args) -> int:
    from ipa_lib.cli.cluster import cmd_preflight

    return cmd_preflight(args)


def cmd_report(args) -> int:
    from ipa_lib.cli.report import main as report_main

    return report_main(args.extra)


def cmd_pipeline(args) -> int:
    from ipa_lib.orchestration import kfp as kfp_cli

    return kfp_cli.main(args)


def build_parser() -> argparse.ArgumentParser:
    from ipa_lib.cli import features as features_cli
    from ipa_lib.cli import hands as hands_cli
    from ipa_lib.cli.stages import (cmd_evaluate, cmd_gate, cmd_pretrain, cmd_promote, cmd_register, cmd_sample,
                                    cmd_show, cmd_smoke, cmd_train)

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
    p.add_argument("--adapter", help="adapter folder (default: train.out)")
    p.add_argument("--base-model", help="base model folder (default: backend.base_model)")
    p.add_argument("--metrics", help="evaluation metrics file (default: evaluate.metrics)")
    p = stage("promote", cmd_promote, "move the champion alias if the candidate is measurably better")
    p.add_argument("--candidate", type=int), p.add_argument("--to-version", type=int, help="roll back: point the alias at version N")
    p.add_argument("--dry-run", action="store_true")
    p = stage("smoke", cmd_smoke, "build a tiny backend, generate, train a few steps, round-trip adapters")
    p.add_argument("--backend", default="wan-animate", choices=["toy", "wan-animate"])

    # report parses its own options (ipa report --help): its module needs numpy at import
    p = sub.add_parser("report", help="the method x beta table, curves and claims -> docs/results.md", add_help=False)
    p.set_defaults(func=cmd_report)

    hands_cli.add_commands(sub)
    features_cli.add_command(sub)

    cluster = sub.add_parser("cluster", help="Kubernetes cluster checks").add_subparsers(dest="cluster_cmd", required=True)
    p = cluster.add_parser("preflight", help="check what a pipeline run needs in the cluster")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param, e.g. pipeline.namespace=ml")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
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
    p = psub.add_parser("run-local", help="run the DAG with kfp.local (subprocesses, or containers of the runtime image)")
    p.add_argument("--workdir", default=".ipa/kfp-local")
    p.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="docker: every task in a container of --image through DOCKER_HOST (docs/containers.md)")
    p.add_argument("--image", default=None, help="runtime image for --runner docker (default: localhost/ipa-runtime:0.1.0, `make image`)")
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
