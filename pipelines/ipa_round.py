"""The KFP v2 pipeline of one alignment round.

    ExitHandler(record-failure) {
        resolve-params -> ParallelFor(shard in shards: sample-shard) -> merge-shards -> gate
            -> ParallelFor(beta in betas: train -> evaluate
                           | with evaluate.shards > 1: ParallelFor(shard: evaluate-shard) -> merge-evaluations)
            -> select-best -> register -> decide-promotion -> If(decision == promote): promote }

Sampling fans out: one `sample-shard` pod per shard of the clip store (`sample.shards` on
cases, one on the toy world: `ipa_lib.stages.sample.shard_indices`, fixed at compile time),
then `merge-shards` checks the union (each shard once, no duplicate clip ids, every planned
clip) and writes the store the gate reads, the same store `ipa sample` writes. The model's
tasks (sample-shard, train, evaluate) run on the GPU pool (`_gpu_pod`) unless `cpu_only`.
Evaluation fans out the same way when `evaluate.shards` > 1 (compile time): one
`evaluate-shard` GPU pod per shard inside each sweep member, then `merge-evaluations`, which
checks the union and writes the evaluate task's artifacts and metrics (select-best reads them
unchanged); with one shard the sweep member runs the `evaluate` task as before.

`build_pipeline(params)` returns the @dsl.pipeline function. Its parameters are
`params_json` (the whole validated params.yaml as JSON), `betas` (the sweep), the typed
knobs of `ipa_lib.orchestration.kfp.TYPED_PARAMETERS` (train steps, lr, hand weight, clips,
gate threshold and top-k, init adapter), which `resolve-params` applies onto params_json for
every later task, and `base_model` (folder of the base model; on the workspace PVC in the
cluster); their defaults come from `params`. Cluster settings (images, GPU pool or
`cpu_only`, PVC, secrets, image pull secrets, retries, timeouts, caching) are compile-time
and also come from `params.pipeline`. `record-failure` runs after everything: when the run
failed it marks the round's MLflow run FAILED, naming the failed task. `kfp.local` ignores
the Kubernetes settings and runs the same DAG.
"""

# no `from __future__ import annotations`: KFP reads the pipeline function's real annotations

from pathlib import PurePosixPath

from ipa_lib.core.config import Params
from ipa_lib.orchestration.kfp import canonical_json, typed_values

PIPELINE_NAME = "ipa-round"
# tasks that talk to MLflow: every stage logs its stage run (merge-shards the sample stage's;
# sample-shard may start from `backend.init_adapter`, a models:/ URI), the exit handler marks a failed round; select-best
# only copies files
MLFLOW_TASKS = ("sample-shard", "merge-shards", "gate", "train", "evaluate", "merge-evaluations", "register", "decide-promotion",
                "promote", "record-failure")
# tasks that read the base model (or, merge-shards, the cases) from the workspace PVC
PVC_TASKS = ("sample-shard", "merge-shards", "train", "evaluate", "evaluate-shard", "merge-evaluations", "register")
# tasks never served from cache: sampling and training (inputs do not pin the data
# version), everything that writes to the model registry, and the exit handler
NO_CACHE_TASKS = ("sample-shard", "merge-shards", "train", "register", "decide-promotion", "promote", "record-failure")


def params_json(params: Params) -> str:
    """The pipeline's `params_json` argument: canonical JSON of the validated params."""
    return canonical_json(params)


def cluster_base_model(params: Params) -> str:
    """`backend.base_model` as the pods see it: a repo-relative folder (the toy default
    `models/base`) lives on the workspace PVC under `pipeline.mount_path`; an absolute path
    or a wan-animate hub id (`org/name`, not under models/ or data/) is passed unchanged."""
    raw = params.backend.base_model
    path = PurePosixPath(raw)
    on_pvc = params.backend.name == "toy" or raw.startswith(".") or path.parts[:1] in (("models",), ("data",))
    if path.is_absolute() or not on_pvc:
        return raw
    return cluster_path(params, raw)


def cluster_path(params: Params, raw: str) -> str:
    """A repo-relative path (`data/cases`) as the pods see it: on the workspace PVC under
    `pipeline.mount_path`; an absolute path is passed unchanged."""
    path = PurePosixPath(raw)
    return raw if path.is_absolute() else str(PurePosixPath(params.pipeline.mount_path) / path)


def _mlflow_env(task, pc) -> None:
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, secret_name=pc.mlflow_secret,
                                 secret_key_to_env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    # only for a tracking server behind authentication (k8s/README.md, "Secrets")
    kubernetes.use_secret_as_env(task, secret_name=pc.mlflow_secret, optional=True,
                                 secret_key_to_env={"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                                    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})


def _configure(task, name: str, pc) -> None:
    """Per-task cluster settings: caching, timeout, image pull secrets, workspace PVC, MLflow secret."""
    from kfp import kubernetes

    task.set_caching_options(name not in NO_CACHE_TASKS)
    kubernetes.set_timeout(task, pc.task_timeout_s[name])  # the pod's activeDeadlineSeconds
    if pc.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(pc.image_pull_secrets))
    if name in PVC_TASKS:
        kubernetes.mount_pvc(task, pvc_name=pc.pvc_name, mount_path=pc.mount_path)
    if name in MLFLOW_TASKS:
        _mlflow_env(task, pc)


GPU_TASKS = ("sample-shard", "train", "evaluate", "evaluate-shard")  # the model's forward passes


def _gpu_pod(task, pc) -> None:
    """A pod of GPU_TASKS: GPU node pool (unless `cpu_only`), resources, retries, in-memory /dev/shm."""
    from kfp import kubernetes

    if not pc.cpu_only:
        task.set_accelerator_type(pc.accelerator_type)
        task.set_accelerator_limit(pc.accelerator_limit)
        for key, value in sorted(pc.node_selector.items()):
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        # every effect of the GPU taint (GKE: nvidia.com/gpu=present:NoSchedule), as k8s/README.md says
        kubernetes.add_toleration(task, key=pc.gpu_toleration_key, operator="Exists")
    task.set_cpu_request(pc.cpu_request)
    task.set_cpu_limit(pc.cpu_limit)
    task.set_memory_request(pc.memory_request)
    task.set_memory_limit(pc.memory_limit)
    if pc.train_retries:  # a node lost mid-run; a retry redoes the task (same seeds, same result)
        task.set_retry(num_retries=pc.train_retries, backoff_duration="60s", backoff_factor=2.0)
    # PyTorch data loaders die with bus errors on the default 64 MB /dev/shm
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=pc.shm_size_limit)


def build_pipeline(params: Params):
    """The round as a @dsl.pipeline function, defaults and cluster settings from `params`."""
    from kfp import dsl

    from components.stages import build
    from ipa_lib.stages.evaluate import evaluation_shards
    from ipa_lib.stages.sample import shard_indices

    pc = params.pipeline
    c = build(pc.image, pc.image if pc.cpu_only else pc.gpu_image)
    default_params, default_betas, default_base = params_json(params), list(pc.betas), cluster_base_model(params)
    t = typed_values(params)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="One IPA alignment round: sample (one GPU pod per shard), gate, sweep beta (train + evaluate on the GPU pool), "
                    "select the best, register it in MLflow, promote it only when it beats the champion.",
    )
    def ipa_round(params_json: str = default_params, betas: list = default_betas,
                  train_steps: int = t["train_steps"], train_lr: float = t["train_lr"],
                  hand_weight: float = t["hand_weight"], num_clips: int = t["num_clips"],
                  gate_threshold: float = t["gate_threshold"], gate_top_k: int = t["gate_top_k"],
                  base_model: str = default_base, init_adapter: str = t["init_adapter"]):
        # runs last, whatever happened; needs no task output (the round is found by its tag)
        failed = c["record_failure"](params_json=params_json, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        _configure(failed, "record-failure", pc)
        with dsl.ExitHandler(failed, name="round"):
            resolved = c["resolve_params"](params_json=params_json, train_steps=train_steps, train_lr=train_lr,
                                           hand_weight=hand_weight, num_clips=num_clips, gate_threshold=gate_threshold,
                                           gate_top_k=gate_top_k, init_adapter=init_adapter)
            _configure(resolved, "resolve-params", pc)
            p = resolved.outputs["Output"]  # every later task's params: its cache key includes all of them
            p_artifact = resolved.outputs["params"]  # the same, for the tasks inside the sweep
            # the shard count is compiled in; merge-shards refuses a run whose params_json plans other shards
            with dsl.ParallelFor(items=shard_indices(params), name="sample-shards") as shard:
                sharded = c["sample_shard"](params=p_artifact, shard=shard, base_model=base_model)
                _configure(sharded, "sample-shard", pc)
                _gpu_pod(sharded, pc)
            sampled = c["merge_shards"](params_json=p, base_model=base_model, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                        shards=dsl.Collected(sharded.outputs["sampled"]))
            _configure(sampled, "merge-shards", pc)
            gated = c["gate"](params_json=p, samples=sampled.outputs["samples"])
            _configure(gated, "gate", pc)

            with dsl.ParallelFor(items=betas, name="beta-sweep") as beta:
                trained = c["train"](params=p_artifact, beta=beta, base_model=base_model,
                                     kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, gated=gated.outputs["gated"])
                _configure(trained, "train", pc)
                _gpu_pod(trained, pc)
                if params.evaluate.shards > 1:  # compiled in; merge-evaluations refuses other params
                    with dsl.ParallelFor(items=evaluation_shards(params), name="evaluate-shards") as eval_shard:
                        part = c["evaluate_shard"](params=p_artifact, shard=eval_shard, base_model=base_model,
                                                   adapter=trained.outputs["adapter"])
                        _configure(part, "evaluate-shard", pc)
                        _gpu_pod(part, pc)
                    evaluated = c["merge_evaluations"](params=p_artifact, beta=beta, adapter=trained.outputs["adapter"],
                                                       shards=dsl.Collected(part.outputs["evaluated"]))
                    _configure(evaluated, "merge-evaluations", pc)
                else:
                    evaluated = c["evaluate"](params=p_artifact, beta=beta, base_model=base_model,
                                              adapter=trained.outputs["adapter"])
                    _configure(evaluated, "evaluate", pc)
                    _gpu_pod(evaluated, pc)

            best = c["select_best"](params_json=p, adapters=dsl.Collected(trained.outputs["adapter"]),
                                    evaluations=dsl.Collected(evaluated.outputs["evaluation"]))
            _configure(best, "select-best", pc)
            registered = c["register"](params_json=p, base_model=base_model, adapter=best.outputs["best_adapter"],
                                       evaluation=best.outputs["best_evaluation"])
            _configure(registered, "register", pc)
            decided = c["decide_promotion"](params_json=p, version=registered.outputs["Output"])
            _configure(decided, "decide-promotion", pc)
            # dsl.If is kfp 2.x's name for dsl.Condition (deprecated alias, same IR: a trigger
            # condition). The decision is the task's single output: kfp.local resolves conditions
            # on `<task>-Output` channels only.
            with dsl.If(decided.outputs["Output"] == True, name="only-when-better"):  # noqa: E712 (a pipeline expression)
                promoted = c["promote"](params_json=p, version=registered.outputs["Output"])
                _configure(promoted, "promote", pc)
        # no pipeline outputs: KFP returns none from inside an ExitHandler. The results are
        # select-best's (beta, best_adapter, best_evaluation) and register's (version).

    return ipa_round


def compile_pipeline(params: Params, out: str) -> str:
    """Write the IR YAML for `params` to `out`."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(params), package_path=str(out))
    return str(out)
