"""The KFP v2 pipeline of one alignment round.

    sample -> gate -> ParallelFor(beta in betas: train -> evaluate) -> select-best
        -> register -> decide-promotion -> If(decision == promote): promote

`build_pipeline(params)` returns the @dsl.pipeline function. Its parameters are
`params_json` (the whole validated params.yaml as JSON), `betas` (the sweep) and
`base_model` (folder of the base model; on the workspace PVC in the cluster); their
defaults come from `params`. Cluster settings (images, GPU pool, PVC, secret, retries,
caching) are compile-time and also come from `params.pipeline`. `kfp.local` ignores the
Kubernetes settings and runs the same DAG.
"""

# no `from __future__ import annotations`: KFP reads the pipeline function's real annotations

import json
from pathlib import PurePosixPath
from typing import NamedTuple

from ipa_lib.core.config import Params

PIPELINE_NAME = "ipa-round"
# tasks that talk to MLflow: every stage logs its stage run (sample may also start from
# `backend.init_adapter`, a models:/ URI); select-best only copies files
MLFLOW_TASKS = ("sample", "gate", "train", "evaluate", "register", "decide-promotion", "promote")
# tasks that read the base model from the workspace PVC
PVC_TASKS = ("sample", "train", "evaluate", "register")
# tasks never served from cache: sampling and training (inputs do not pin the data
# version), and everything that writes to the model registry
NO_CACHE_TASKS = ("sample", "train", "register", "decide-promotion", "promote")


def params_json(params: Params) -> str:
    """The pipeline's `params_json` argument: canonical JSON of the validated params."""
    return json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def cluster_base_model(params: Params) -> str:
    """`backend.base_model` as the pods see it: a repo-relative folder (the toy default
    `models/base`) lives on the workspace PVC under `pipeline.mount_path`; an absolute path
    or a wan-animate hub id (`org/name`, not under models/ or data/) is passed unchanged."""
    raw = params.backend.base_model
    path = PurePosixPath(raw)
    on_pvc = params.backend.name == "toy" or raw.startswith(".") or path.parts[:1] in (("models",), ("data",))
    if path.is_absolute() or not on_pvc:
        return raw
    return str(PurePosixPath(params.pipeline.mount_path) / path)


def _mlflow_env(task, pc) -> None:
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, secret_name=pc.mlflow_secret,
                                 secret_key_to_env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
    # only for a tracking server behind authentication (k8s/README.md, "Secrets")
    kubernetes.use_secret_as_env(task, secret_name=pc.mlflow_secret, optional=True,
                                 secret_key_to_env={"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                                    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})


def _configure(task, name: str, pc) -> None:
    """Per-task cluster settings: caching, workspace PVC, MLflow secret."""
    from kfp import kubernetes

    task.set_caching_options(name not in NO_CACHE_TASKS)
    if name in PVC_TASKS:
        kubernetes.mount_pvc(task, pvc_name=pc.pvc_name, mount_path=pc.mount_path)
    if name in MLFLOW_TASKS:
        _mlflow_env(task, pc)


def _gpu_pool(task, pc) -> None:
    """The training pod: GPU node pool, resources, retries, in-memory /dev/shm."""
    from kfp import kubernetes

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
    if pc.train_retries:  # a node lost mid-run; each retry trains from scratch (same seeds, same result)
        task.set_retry(num_retries=pc.train_retries, backoff_duration="60s", backoff_factor=2.0)
    # PyTorch data loaders die with bus errors on the default 64 MB /dev/shm
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=pc.shm_size_limit)


def build_pipeline(params: Params):
    """The round as a @dsl.pipeline function, defaults and cluster settings from `params`."""
    from kfp import dsl
    from kfp.dsl import Artifact, Model

    from components.stages import build

    pc = params.pipeline
    c = build(pc.image, pc.gpu_image)
    default_params, default_betas, default_base = params_json(params), list(pc.betas), cluster_base_model(params)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="One IPA alignment round: sample, gate, sweep beta (train + evaluate on the GPU pool), "
                    "select the best, register it in MLflow, promote it only when it beats the champion.",
    )
    def ipa_round(params_json: str = default_params, betas: list = default_betas, base_model: str = default_base
                  ) -> NamedTuple("Outputs", [("best_beta", float), ("best_adapter", Model), ("best_evaluation", Artifact),
                                              ("model_version", int)]):
        sampled = c["sample"](params_json=params_json, base_model=base_model)
        _configure(sampled, "sample", pc)
        gated = c["gate"](params_json=params_json, samples=sampled.outputs["samples"])
        _configure(gated, "gate", pc)

        with dsl.ParallelFor(items=betas, name="beta-sweep") as beta:
            trained = c["train"](params_json=params_json, beta=beta, base_model=base_model,
                                 gated=gated.outputs["gated"])
            _configure(trained, "train", pc)
            _gpu_pool(trained, pc)
            evaluated = c["evaluate"](params_json=params_json, beta=beta, base_model=base_model,
                                      adapter=trained.outputs["adapter"])
            _configure(evaluated, "evaluate", pc)

        best = c["select_best"](params_json=params_json, adapters=dsl.Collected(trained.outputs["adapter"]),
                                evaluations=dsl.Collected(evaluated.outputs["evaluation"]))
        _configure(best, "select-best", pc)
        registered = c["register"](params_json=params_json, base_model=base_model, adapter=best.outputs["best_adapter"],
                                   evaluation=best.outputs["best_evaluation"])
        _configure(registered, "register", pc)
        decided = c["decide_promotion"](params_json=params_json, version=registered.outputs["Output"])
        _configure(decided, "decide-promotion", pc)
        # dsl.If is kfp 2.x's name for dsl.Condition (deprecated alias, same IR: a trigger
        # condition). The decision is the task's single output: kfp.local resolves conditions
        # on `<task>-Output` channels only.
        with dsl.If(decided.outputs["Output"] == True, name="only-when-better"):  # noqa: E712 (a pipeline expression)
            promoted = c["promote"](params_json=params_json, version=registered.outputs["Output"])
            _configure(promoted, "promote", pc)

        outputs = NamedTuple("Outputs", [("best_beta", float), ("best_adapter", Model), ("best_evaluation", Artifact),
                                         ("model_version", int)])
        return outputs(best.outputs["beta"], best.outputs["best_adapter"], best.outputs["best_evaluation"],
                       registered.outputs["Output"])

    return ipa_round


def compile_pipeline(params: Params, out: str) -> str:
    """Write the IR YAML for `params` to `out`."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(params), package_path=str(out))
    return str(out)
