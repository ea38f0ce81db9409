"""KFP components of one alignment round: each stage is a few lines that call `ipa_lib`.

These are plain functions; `build(image, gpu_image)` turns them into lightweight Python
components whose `base_image` is the project's runtime image (components/Dockerfile),
with `install_kfp_package=False`: the image already carries ipa_lib, kfp and every
dependency, so pods need no network. KFP serializes each function's source into the
pipeline, so everything a function uses is imported inside its body.

Every stage takes the whole validated parameter set as `params_json` and parses it with
`ipa_lib.core.config.parse_params`, so a task means what the same DVC stage means: the
pipeline's `params_json` (params.yaml, see `ipa_lib.orchestration.kfp`) with its typed
parameters (train steps, lr, ...) applied by `resolve_params`, the first task. Like `ipa <stage>`, every stage runs in its
MLflow stage run (`ipa_lib.mlops.tracking.tracked_stage`); the lineage file each output carries
puts all stages of one pipeline run, and its registered version, under one round run.
"""

# no `from __future__ import annotations`: KFP reads the real annotations
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def resolve_params(params_json: str, train_steps: int, train_lr: float, hand_weight: float, num_clips: int,
                   gate_threshold: float, gate_top_k: int, init_adapter: str, params: Output[Artifact]) -> str:
    """`params_json` with the typed pipeline parameters applied and validated: every task's params,
    returned as a string and also written to the `params` artifact (params.json) for the tasks
    inside the beta sweep (kfp.local replaces a task-output parameter fed into a ParallelFor with the
    loop item; artifacts pass through)."""
    from pathlib import Path

    from ipa_lib.orchestration.kfp import resolve_params as run

    resolved = run(params_json, {"train_steps": train_steps, "train_lr": train_lr, "hand_weight": hand_weight,
                                 "num_clips": num_clips, "gate_threshold": gate_threshold, "gate_top_k": gate_top_k,
                                 "init_adapter": init_adapter})
    Path(params.path).write_text(resolved)
    return resolved


def sample_shard(params: Input[Artifact], shard: int, base_model: str, sampled: Output[Dataset]):
    """Sample one shard of the clip store from the base model (+ `backend.init_adapter`), one
    pod per shard: shard-NNN.npz + its cases' conditioning + shard.json (merge-shards checks them)."""
    import json
    from pathlib import Path

    from ipa_lib.core.config import parse_params
    from ipa_lib.stages.sample import sample_one_shard

    p = parse_params(json.loads(Path(params.path).read_text()), "params (resolve-params)")
    sampled.metadata.update(sample_one_shard(p, shard, sampled.path, base_model, progress=False))


def merge_shards(params_json: str, base_model: str, kfp_run_id: str, shards: Input[List[Dataset]],
                 samples: Output[Dataset]):
    """The sample stage's result: validate the sampled shards (each once, no duplicate clip ids,
    every planned clip) and assemble the clip store the gate reads (the store `ipa sample` writes)."""
    import json

    from ipa_lib.core.config import parse_params
    from ipa_lib.mlops.tracking import tracked_stage
    from ipa_lib.stages.sample import merge_shards as run

    params = parse_params(json.loads(params_json), "params_json")
    result = tracked_stage(params, "sample", lambda p: run(p, [s.path for s in shards], samples.path, base_model),
                           inputs=[], output=samples.path, round_tags={"ipa.kfp.run_id": kfp_run_id})
    samples.metadata.update(result)


def gate(params_json: str, samples: Input[Dataset], gated: Output[Dataset], report: Output[Markdown]):
    """Score hands, validate the scored manifest, keep the best samples."""
    import json
    import shutil

    from ipa_lib.core.config import parse_params
    from ipa_lib.stages.gate import gate as run
    from ipa_lib.mlops.tracking import tracked_stage

    params = parse_params(json.loads(params_json), "params_json")
    result = tracked_stage(params, "gate", lambda p: run(p, samples.path, gated.path, progress=False),
                           inputs=[(samples.path, "samples")], output=gated.path)
    gated.metadata.update(result)
    shutil.copy(f"{gated.path}/report.md", report.path)


def train(params: Input[Artifact], beta: float, base_model: str, kfp_run_id: str, gated: Input[Dataset], adapter: Output[Model],
          metrics: Output[Metrics]):
    """LoRA alignment with `train.loss` at this `beta`: adapter (diffusers LoRA format) + log."""
    import json
    from pathlib import Path

    from ipa_lib.core.config import parse_params
    from ipa_lib.mlops.tracking import tracked_stage
    from ipa_lib.stages.train import train_in_pod as run  # accelerate launch, one process per GPU (accelerator_limit)

    params = parse_params(json.loads(Path(params.path).read_text()), "params (resolve-params)")
    params.train.beta = beta  # validated on assignment (> 0)
    # checkpoints on the workspace PVC (kfp.local has none: beside the artifact): a retried pod
    # resumes the latest checkpoint of the same key (params, gated data, base model, beta)
    mount = Path(params.pipeline.mount_path)
    checkpoints = str(mount / "checkpoints") if mount.is_dir() else None
    if params.pipeline.train_nodes > 1:  # submit a TrainJob/PyTorchJob and wait (ipa_lib/orchestration/trainjob.py)
        def run(p, gated_dir, out_dir, base, metrics_path=None, curve_path=None, **_):
            from ipa_lib.orchestration.trainjob import run_train_job
            from ipa_lib.stages.train import write_train_metrics

            result = run_train_job(p, gated_dir, out_dir, base, kfp_run_id)
            write_train_metrics(result, metrics_path, curve_path)
            return result
    summary = tracked_stage(params, "train", lambda p: run(p, gated.path, adapter.path, base_model, progress=False,
                                                          checkpoint_root=checkpoints,
                                                          # the metrics/train*.json of a DVC run, inside the artifact
                                                          metrics_path=f"{adapter.path}/train_metrics.json",
                                                          curve_path=f"{adapter.path}/train_curve.json"),
                            inputs=[(gated.path, "gated-samples")], output=adapter.path, dvc_stage=f"train@{beta:g}",
                            # a retry opens a new round (train@beta ran in this one): tag it too
                            round_tags={"ipa.kfp.run_id": kfp_run_id})
    for k, v in summary["final"].items():
        metrics.log_metric(f"train/{k}", v)
    adapter.metadata.update({"beta": beta, "loss": summary["loss"], "steps": summary["steps"]})


def evaluate(params: Input[Artifact], beta: float, base_model: str, adapter: Input[Model],
             evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[HTML]):
    """Base vs aligned on held-out poses: eval.json + per-clip rows + side-by-side strip."""
    import json
    from pathlib import Path

    from ipa_lib.core.config import parse_params
    from ipa_lib.stages.evaluate import evaluate as run
    from ipa_lib.stages.select import eval_metric_items, evaluation_html
    from ipa_lib.mlops.tracking import tracked_stage

    params = parse_params(json.loads(Path(params.path).read_text()), "params (resolve-params)")
    params.train.beta = beta
    result = tracked_stage(params, "evaluate", lambda p: run(p, adapter.path, evaluation.path, f"{evaluation.path}/eval.json", base_model, progress=False,
                                                             # cases: the val split, what select-best and promotion use
                                                             val_metrics_path=f"{evaluation.path}/eval_val.json"),
                           inputs=[(adapter.path, "adapter")], output=evaluation.path, dvc_stage=f"evaluate@{beta:g}")
    for k, v in eval_metric_items(result).items():
        metrics.log_metric(k, v)
    Path(report.path).write_text(evaluation_html(result, f"{evaluation.path}/side_by_side.png", f"beta = {beta:g}"))


def evaluate_shard(params: Input[Artifact], shard: int, base_model: str, adapter: Input[Model],
                   evaluated: Output[Artifact]):
    """Evaluate one shard (`evaluate.shards`), one pod per shard: its per-clip rows and clips +
    shard.json (merge-evaluations checks them). No beta parameter: kfp.local would replace an
    enclosing loop's item inside this nested loop (the adapter carries the beta)."""
    import json
    from pathlib import Path

    from ipa_lib.core.config import parse_params
    from ipa_lib.stages.evaluate import evaluate_shard as run

    p = parse_params(json.loads(Path(params.path).read_text()), "params (resolve-params)")
    evaluated.metadata.update(run(p, adapter.path, shard, evaluated.path, base_model, progress=False))


def merge_evaluations(params: Input[Artifact], beta: float, adapter: Input[Model], shards: Input[List[Artifact]],
                      evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[HTML]):
    """The evaluate stage's result from its shards (each once, same params and adapter, every
    planned clip once): the artifacts and metrics the evaluate task writes."""
    import json
    from pathlib import Path

    from ipa_lib.core.config import parse_params
    from ipa_lib.mlops.tracking import tracked_stage
    from ipa_lib.stages.evaluate import merge_evaluations as run
    from ipa_lib.stages.select import eval_metric_items, evaluation_html

    params = parse_params(json.loads(Path(params.path).read_text()), "params (resolve-params)")
    params.train.beta = beta
    result = tracked_stage(params, "evaluate", lambda p: run(p, [s.path for s in shards], evaluation.path, f"{evaluation.path}/eval.json",
                                                             val_metrics_path=f"{evaluation.path}/eval_val.json"),
                           inputs=[(adapter.path, "adapter")], output=evaluation.path, dvc_stage=f"evaluate@{beta:g}")
    for k, v in eval_metric_items(result).items():
        metrics.log_metric(k, v)
    Path(report.path).write_text(evaluation_html(result, f"{evaluation.path}/side_by_side.png", f"beta = {beta:g}"))


def select_best(params_json: str, adapters: Input[List[Model]], evaluations: Input[List[Artifact]],
                best_adapter: Output[Model], best_evaluation: Output[Artifact],
                report: Output[Markdown]) -> NamedTuple("Outputs", [("beta", float), ("value", float)]):
    """The sweep's best run by the promotion rule's primary metric (on cases: on the val split);
    copies its adapter and evaluation."""
    import json
    from pathlib import Path

    from ipa_lib.core.config import parse_params
    from ipa_lib.stages.select import select_from_runs, selection_markdown

    params = parse_params(json.loads(params_json), "params_json")
    chosen = select_from_runs([e.path for e in evaluations], [a.path for a in adapters],
                              params.promote_rule.primary_metric, best_adapter.path, best_evaluation.path,
                              eval_file="eval_val.json")
    Path(report.path).write_text(selection_markdown(chosen))
    return (chosen["beta"], chosen["value"])


def register(params_json: str, base_model: str, adapter: Input[Model], evaluation: Input[Artifact],
             registration: Output[Artifact]) -> int:
    """Register the chosen adapter (+ base) as a new version of `tracking.registered_model`."""
    import json

    from ipa_lib.core.config import parse_params
    from ipa_lib.mlops.registry import register_model
    from ipa_lib.mlops.tracking import read_lineage

    params = parse_params(json.loads(params_json), "params_json")
    # promotion decides on the val split (the report's numbers, eval.json, are the test split)
    return register_model(params, adapter.path, base_model, f"{evaluation.path}/eval_val.json",
                          lineage_in=read_lineage(evaluation.path), record_path=registration.path)


def decide_promotion(params_json: str, version: int, report: Output[Markdown]) -> bool:
    """Dry run of the promotion policy against the current champion (changes nothing):
    whether `version` would be promoted; the reason and numbers go to the report."""
    import json
    from pathlib import Path

    from ipa_lib.core.config import parse_params
    from ipa_lib.mlops.registry import promote
    from ipa_lib.stages.select import decision_markdown

    decision = promote(parse_params(json.loads(params_json), "params_json"), version, dry_run=True)
    Path(report.path).write_text(decision_markdown(decision))
    return decision.promote


def promote(params_json: str, version: int, report: Output[Markdown]) -> NamedTuple("Outputs", [("promoted", bool), ("reason", str)]):
    """Move the champion alias to `version`; decided again under the registry's promotion lock."""
    import json
    from pathlib import Path

    from ipa_lib.core.config import parse_params
    from ipa_lib.mlops.registry import promote as run
    from ipa_lib.stages.select import decision_markdown

    decision = run(parse_params(json.loads(params_json), "params_json"), version, dry_run=False)
    Path(report.path).write_text(decision_markdown(decision))
    return (decision.promote, decision.reason)


def record_failure(params_json: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: when the run did not succeed, mark its MLflow round run(s) FAILED, naming the failed task."""
    import json

    from ipa_lib.core.config import parse_params
    from ipa_lib.mlops.tracking import fail_round

    if status.state == "SUCCEEDED":
        return "succeeded"
    reason = f"KFP run {status.state}: {status.pipeline_task_name}: {status.error_message or 'no message'}"
    rounds = fail_round(parse_params(json.loads(params_json), "params_json"), kfp_run_id, reason)
    return json.dumps(rounds) if rounds else f"no round run is tagged ipa.kfp.run_id={kfp_run_id} ({reason})"


STAGES = (resolve_params, sample_shard, merge_shards, gate, train, evaluate, evaluate_shard, merge_evaluations, select_best,
          register, decide_promotion, promote, record_failure)
GPU_STAGES = (sample_shard, train, evaluate, evaluate_shard)  # the model's forward passes


def build(image: str, gpu_image: str) -> dict:
    """Components by function name, each running in `image` (`gpu_image` for GPU_STAGES)."""
    return {
        fn.__name__: dsl.component(fn, base_image=gpu_image if fn in GPU_STAGES else image, install_kfp_package=False)
        for fn in STAGES
    }
