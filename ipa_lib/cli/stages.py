"""`ipa pretrain | sample | gate | train | evaluate | show | register | promote | smoke`.

Each command loads `params.yaml` (+ `--set key=value`), runs one stage of `ipa_lib.stages`
inside its MLflow stage run and prints the stage's result; the stage writes its own files.
"""

from __future__ import annotations

import json
import os
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
    from ipa_lib.stages.train import train

    params = _params(args)
    gated, out = args.gated or params.gate.out, args.out or params.train.out

    def run(p):
        return train(p, gated, out, args.base_model, resume=args.resume, progress=not args.quiet,
                     stop_after=args.stop_after, metrics_path=p.train.metrics, curve_path=p.train.curve,
                     checkpoint_root=args.checkpoint_root)

    if int(os.environ.get("RANK", "0")) > 0:  # accelerate launch / torchrun: rank 0 alone records the run
        run(params)
        return 0
    result = tracked_stage(params, "train", run, inputs=[(gated, "gated-samples")], output=out)
    result.pop("log", None)
    _print(result)
    return 0


def cmd_evaluate(args) -> int:
    from ipa_lib.core.results import eval_table
    from ipa_lib.stages.evaluate import evaluate

    params = _params(args)
    adapter, out = args.adapter or params.train.out, args.out or params.evaluate.out
    metrics = args.metrics or params.evaluate.metrics
    result = tracked_stage(params, "evaluate", lambda p: evaluate(p, adapter, out, metrics, args.base_model, progress=not args.quiet,
                                                                  val_metrics_path=p.evaluate.val_metrics, gated_dir=args.gated),
                           inputs=[(adapter, "adapter")], output=out)
    print(eval_table(result))
    return 0


def cmd_show(args) -> int:
    from ipa_lib.core.io import read_json
    from ipa_lib.core.results import eval_table

    print(eval_table(read_json(args.metrics, "evaluation metrics")))
    return 0


def cmd_register(args) -> int:
    from ipa_lib.stages.register import register

    params = _params(args)
    record = register(params, adapter_dir=args.adapter, base_model_dir=args.base_model, metrics_path=args.metrics)
    if not record.get("version"):
        print(f"nothing registered: {record.get('reason', 'no version')}")
        return 0
    name, version = record["name"], record["version"]
    print(f"registered {name} version {version} (models:/{name}/{version}); record: {params.tracking.register_out}")
    return 0


def cmd_promote(args) -> int:
    from ipa_lib.core.decisions import format_decision
    from ipa_lib.stages.promote import promote_stage

    d = promote_stage(_params(args), args.candidate, args.dry_run, args.to_version)
    print("tracking disabled: no promotion" if d is None else format_decision(d))
    return 0


def cmd_smoke(args) -> int:
    from ipa_lib.stages.smoke import smoke_main

    return smoke_main(args.backend)
