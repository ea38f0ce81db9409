"""`ipa`: one CLI for DVC stages, container entrypoints and people.

Each subcommand parses arguments, loads `params.yaml` (+ `--set key=value` overrides) and
calls one library function; nothing here decides anything the library does not own.
Command groups live in their own modules: `stages` (pretrain ... promote), `hands`,
`cluster`, `report`, `features`; `ipa pipeline` drives `ipa_lib.orchestration.kfp`; `logs`
sets up logging (`ipa -v` / `--log-level`). Every command that reads params takes
`--params`/`--set` after its (sub)command. Errors follow one policy for every command,
`ipa_lib.core.errors.exit_code` (bad input 2, failure 1).
Heavy libraries are imported inside the handlers so `ipa --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from ipa_lib.cli.logs import LEVELS, resolve_level, setup_logging

SMOKE_HELP = "build a tiny backend, generate, train a few steps, round-trip adapters"


def cmd_cluster_preflight(args) -> int:
    from ipa_lib.cli.cluster import cmd_preflight

    return cmd_preflight(args)


def cmd_report(args) -> int:
    from ipa_lib.cli.report import main as report_main

    return report_main(args.extra)


def cmd_pipeline(args) -> int:
    """`--params`/`--set` given after the subcommand join those given before it (and win)."""
    from ipa_lib.orchestration import kfp as kfp_cli

    args.params = args.sub_params or args.params
    args.set = [*args.set, *args.sub_set]
    return kfp_cli.main(args)


def add_params_args(p: argparse.ArgumentParser, example: str = "train.beta=200", *, dest: str = "") -> None:
    """`--params FILE` and repeatable `--set KEY=VALUE`, the same on every command that reads params."""
    p.add_argument("--params", default=None if dest else "params.yaml", dest=f"{dest}params", metavar="FILE",
                   help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest=f"{dest}set",
                   help=f"override a param, e.g. {example} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from ipa_lib.cli import animate as animate_cli
    from ipa_lib.cli import cases as cases_cli
    from ipa_lib.cli import features as features_cli
    from ipa_lib.cli import hands as hands_cli
    from ipa_lib.cli.stages import (cmd_evaluate, cmd_gate, cmd_pretrain, cmd_promote, cmd_register, cmd_sample,
                                    cmd_show, cmd_smoke, cmd_train)

    parser = argparse.ArgumentParser(prog="ipa", description="Implicit Preference Alignment for pose-driven human image animation.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output: -v INFO, -vv DEBUG")
    parser.add_argument("--log-level", type=str.upper, choices=LEVELS, metavar="LEVEL",
                        help=f"log level, one of {', '.join(LEVELS)} (default: WARNING; overrides -v)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, fn, help: str, *, progress: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_params_args(p)
        if progress:
            p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=fn)
        return p

    base_help = "base model folder (default: backend.base_model)"
    p = stage("pretrain", cmd_pretrain, "pretrain the toy base animator")
    p.add_argument("--out", help="model folder to write (default: pretrain.out)")
    p = stage("sample", cmd_sample, "sample clips from the current model")
    p.add_argument("--out", help="samples folder to write (default: sample.out)")
    p.add_argument("--base-model", help=base_help)
    p.add_argument("--adapter", help="adapter folder or models:/ URI on top of the start model (default: none)")
    p = stage("gate", cmd_gate, "score hands, validate, keep the best samples")
    p.add_argument("--samples", help="samples folder to read (default: sample.out)")
    p.add_argument("--out", help="gated samples folder to write (default: gate.out)")
    p = stage("train", cmd_train, "LoRA alignment (IPA or a baseline) on the gated samples")
    p.add_argument("--gated", help="gated samples folder to read (default: gate.out)")
    p.add_argument("--out", help="adapter folder to write (default: train.out)")
    p.add_argument("--base-model", help=base_help)
    again = p.add_mutually_exclusive_group()  # neither: resume when the checkpoints' key matches, else start afresh
    again.add_argument("--resume", action="store_const", const=True, default=None,
                       help="insist on continuing from this run's checkpoints (an error naming what changed when there are none)")
    again.add_argument("--fresh", dest="resume", action="store_const", const=False,
                       help="delete this run's checkpoints and start at step 0")
    p.add_argument("--stop-after", type=int, help="stop after N steps, keeping checkpoints (for tests/ops)")
    p.add_argument("--checkpoint-root", help="shared checkpoint folder, e.g. on the workspace PVC (default: beside --out)")
    p = stage("evaluate", cmd_evaluate, "base vs aligned on held-out poses")
    p.add_argument("--adapter", help="adapter folder or models:/ URI (default: train.out)")
    p.add_argument("--out", help="evaluation folder to write (default: evaluate.out)")
    p.add_argument("--metrics", help="metrics file to write (default: evaluate.metrics)")
    p.add_argument("--gated", help="gated set whose poses evaluate.train_poses animates (default: gate.out)")
    p.add_argument("--base-model", help=base_help)
    p = sub.add_parser("show", help="print the base vs aligned table from metrics/eval.json")
    p.add_argument("--metrics", default="metrics/eval.json", help="evaluation metrics file (default: metrics/eval.json)")
    p.set_defaults(func=cmd_show)
    p = stage("register", cmd_register, "log the aligned model to MLflow and register a version", progress=False)
    p.add_argument("--adapter", help="adapter folder (default: train.out)")
    p.add_argument("--base-model", help=base_help)
    p.add_argument("--metrics", help="evaluation metrics file (default: evaluate.metrics)")
    p = stage("promote", cmd_promote, "move the champion alias if the candidate is measurably better", progress=False)
    p.add_argument("--candidate", type=int, help="registered version to judge (default: the one `ipa register` recorded, else the newest)")
    p.add_argument("--to-version", type=int, help="roll back: point the alias at version N")
    p.add_argument("--dry-run", action="store_true", help="decide and print, move no alias")
    p = sub.add_parser("smoke", help=SMOKE_HELP, description=SMOKE_HELP)  # no params: tiny random weights only
    p.add_argument("--backend", default="wan-animate", choices=["toy", "wan-animate"], help="backend to check (default: wan-animate)")
    p.set_defaults(func=cmd_smoke)

    # report parses its own options (ipa report --help): its module needs numpy at import
    p = sub.add_parser("report", help="the method x beta table, curves and claims -> docs/results.md", add_help=False)
    p.set_defaults(func=cmd_report)

    hands_cli.add_commands(sub)
    cases_cli.add_commands(sub)
    features_cli.add_command(sub)
    animate_cli.add_commands(sub, add_params_args)

    cluster = sub.add_parser("cluster", help="Kubernetes cluster checks")
    cluster = cluster.add_subparsers(dest="cluster_cmd", required=True, metavar="COMMAND")
    p = cluster.add_parser("preflight", help="check what a pipeline run needs in the cluster")
    add_params_args(p, "pipeline.namespace=ml")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.set_defaults(func=cmd_cluster_preflight)

    pipeline = sub.add_parser("pipeline", help="Kubeflow Pipelines: compile, submit, run locally")
    add_params_args(pipeline, "train.steps=100")
    psub = pipeline.add_subparsers(dest="pipeline_cmd", required=True, metavar="COMMAND")
    p = psub.add_parser("compile", help="write the pipeline IR YAML")
    p.add_argument("--out", default="pipelines/ipa_round.yaml", help="IR YAML to write (default: pipelines/ipa_round.yaml)")
    p = psub.add_parser("submit", help="submit a run through kfp.Client")
    p.add_argument("--host", required=True, help="KFP API URL, e.g. http://127.0.0.1:8888 "
                   "(kubectl -n kubeflow port-forward svc/ml-pipeline 8888)")
    p.add_argument("--experiment", default=None, help="experiment name (default: tracking.experiment)")
    p.add_argument("--run-name", default=None, help="run display name (default: 'ipa-round <date> <time>')")
    p.add_argument("--namespace", default=None, help="profile namespace on multi-user KFP (default: pipeline.namespace); "
                   "single-user KFP takes none")
    p.add_argument("--existing-token", default=None, metavar="TOKEN|@FILE",
                   help="bearer token for multi-user KFP, sent as 'Authorization: Bearer' with every request "
                   "(kfp.Client's existing_token); @FILE reads it from a file")
    p.add_argument("--cookies", default=None, metavar="COOKIES|@FILE",
                   help="Cookie header for every request, e.g. 'authservice_session=...' from a browser session "
                   "(kfp.Client's cookies); @FILE reads it from a file")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish: exit 0 if it succeeded, "
                   "1 naming the failed task otherwise (kfp.Client does not count CANCELED as finished: add --timeout)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="with --wait: exit 1 if the run has not finished after this many seconds (default: no limit)")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="pipeline parameter override: betas=[200,600], base_model=PATH, params_json=JSON or a "
                   "dotted params key like train.steps=100 (repeatable)")
    p.add_argument("--package", default="pipelines/ipa_round.yaml",
                   help="compiled pipeline package (default: pipelines/ipa_round.yaml, from `ipa pipeline compile`)")
    p = psub.add_parser("run-local", help="run the DAG with kfp.local (subprocesses, or containers of the runtime image)")
    p.add_argument("--workdir", default=".ipa/kfp-local", help="pipeline root of the local run (default: .ipa/kfp-local)")
    p.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="docker: every task in a container of --image through DOCKER_HOST (docs/containers.md)")
    p.add_argument("--image", default=None, help="runtime image for --runner docker (default: localhost/ipa-runtime:0.1.0, `make image`)")
    for p in psub.choices.values():  # also after the subcommand: `ipa pipeline compile --set train.steps=5`
        add_params_args(p, "train.steps=100", dest="sub_")
    pipeline.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "report":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    from ipa_lib.core.errors import exit_code

    setup_logging(resolve_level(args.log_level, args.verbose))

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
