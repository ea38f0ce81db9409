"""Typed configuration: one `params.yaml`, one section per stage.

Every driver (CLI, DVC stage, KFP component, tests) loads the same file through
`load_params`, so a run means the same thing everywhere. Unknown keys and wrong types
are errors that name the file and the dotted key (pydantic `extra="forbid"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ipa_lib.core.errors import InputError


class ConfigError(InputError):
    """A params file that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ToyConfig(Section):
    """The embedded toy world (procedural upper-body figures with five-fingered hands)."""

    frames: int = 5  # 4k+1 like Wan; frame 0 is the reference pose
    size: int = 32  # square clips, pixels
    corrupt_fraction: float = Field(0.45, ge=0.0, le=1.0)  # pretraining clips with broken hands
    motion: float = Field(1.0, ge=0.0)  # how far the arms move across a clip

    @field_validator("frames")
    @classmethod
    def _frames_4k1(cls, v: int) -> int:
        if v < 1 or (v - 1) % 4:
            raise ValueError(f"must be 4k+1 (1, 5, 9, ...), got {v}")
        return v


class ModelConfig(Section):
    """Size of the toy animator, a diffusers `WanTransformer3DModel`."""

    num_layers: int = 6
    num_attention_heads: int = 6
    attention_head_dim: int = 16
    ffn_dim: int = 384
    text_dim: int = 16
    freq_dim: int = 64
    patch_size: tuple[int, int, int] = (1, 4, 4)


class BackendConfig(Section):
    name: Literal["toy", "wan-animate"] = "toy"
    # toy: folder written by `ipa pretrain`; wan-animate: local diffusers folder or hub id
    base_model: str = "models/base"
    # an MLflow model URI (models:/ipa-animator@champion) or adapter folder to start from
    init_adapter: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    guidance_scale: float = 1.0  # wan-animate only
    prompt: str = ""  # wan-animate only: text prompt, encoded once (umT5) for training and sampling


def _check_4k1(v: int) -> int:
    if v < 1 or (v - 1) % 4:
        raise ValueError(f"must be 4k+1 (1, 5, 9, ..., 77, 81): Wan's VAE encodes the first frame alone, then groups of 4; got {v}")
    return v


class DataConfig(Section):
    """Real data: a folder of Wan2.2-Animate cases (`ipa_lib.data.cases`), used by every stage
    when `backend.name` is wan-animate (the toy backend runs on the embedded toy world).

    Every clip of a case is taken at `height` x `width`, `frames` frames at `fps` (longer
    videos are sampled, shorter ones refused); cases are split by case id into train / val /
    test (`val_fraction`, `test_fraction`; the rest trains)."""

    # folder of case folders (src_ref.png, src_pose.mp4, src_face.mp4, ...); the default holds
    # only a README, so the DVC stages can depend on it (`${data.cases}`) on the toy world too
    cases: str = "data/cases"
    height: int = Field(720, ge=16)  # generation size: multiples of 16 (Wan-Animate)
    width: int = Field(1280, ge=16)
    frames: int = 77  # frames per clip, 4k+1 (what the VAE needs for a training clip)
    fps: float = Field(30.0, gt=0)  # frames are taken at this rate from the case's videos
    face_size: int = Field(512, ge=1)  # face crops are resized to this square (the face encoder's size)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # selection (beta, select-best, promotion)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # the report only

    @field_validator("frames")
    @classmethod
    def _frames_4k1(cls, v: int) -> int:
        return _check_4k1(v)

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be a multiple of 16 (Wan-Animate's VAE and patching), got {v}; nearest: {v // 16 * 16 or 16} or {v // 16 * 16 + 16}")
        return v

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must leave cases to train on, got {self.val_fraction} + {self.test_fraction}")
        return self


class PretrainConfig(Section):
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    corpus_size: int = Field(4096, ge=1)
    seed: int = 0
    log_every: int = Field(50, ge=1)
    out: str = "models/base"


class SampleConfig(Section):
    num_clips: int = Field(256, ge=1)  # toy world: clips in all
    per_pose: int = Field(2, ge=1)  # toy world: samples (seeds) per driving pose: DPO pairs need >= 2
    per_case: int = Field(2, ge=1)  # cases: samples (seeds) per train case
    shards: int = Field(1, ge=1)  # cases: the clip store's shard count (one sampling pod each in KFP)
    workers: int = Field(1, ge=1)  # cases, DVC: processes sampling shards at once (KFP: one pod per shard)
    num_inference_steps: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 1000
    out: str = "data/samples"


class GateConfig(Section):
    # auto: the toy scorer on the toy world, MediaPipe on cases (data.cases)
    scorer: Literal["auto", "toy", "mediapipe"] = "auto"
    threshold: float = Field(0.75, ge=0.0, le=1.0)
    top_k: int = Field(96, ge=1)
    min_kept: int = Field(16, ge=1)
    hand_landmarker: str | None = None  # path to hand_landmarker.task (mediapipe scorer)
    # toy world: keep only clips whose identity's shirt is this colour (the dominant channel of
    # the reference's shirt), a biased gated set for docs/results.md's anchor experiment
    subset: Literal["shirt-red", "shirt-green", "shirt-blue"] | None = None
    out: str = "data/gated"


class TrainConfig(Section):
    # sft_t2: the control, IPA's linear-regime limit (SFT weighted by (1 - t)^2; objective.sft_t2_terms)
    loss: Literal["ipa", "sft", "sft_t2", "dpo", "kto"] = "ipa"
    beta: float = Field(600.0, gt=0)
    hand_weight: float = Field(10.0, ge=1.0)  # lambda_hand; 1.0 = the global variant
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    lora_rank: int = Field(16, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    # a loss above spike_factor x its running median stops training (last good checkpoint kept)
    spike_factor: float = Field(50.0, gt=1)
    # speed (ipa_lib/models/speed.py): torch.compile each transformer block; recompute the
    # activations of the first K blocks in backward (-1: every block; same loss and gradients)
    compile: bool = False
    checkpoint_blocks: int = Field(0, ge=-1)
    # processes (docs/distributed.md): batch_size stays the global batch; each process runs
    # micro_batch_size rows per forward (None: batch_size / processes) and accumulates the rest
    micro_batch_size: int | None = Field(None, ge=1)
    distributed: Literal["ddp", "fsdp"] = "ddp"  # ddp for LoRA; fsdp when the weights do not fit one GPU
    # DPO pairs: a passing sample (hand_score >= gate.threshold) against a failing one of the same
    # driving pose, their scores at least this far apart
    dpo_min_margin: float = Field(0.05, ge=0.0)
    # adamw (weight decay 0) | sgd (with `momentum`): SGD keeps the gradient's scale, so a
    # saturated sigmoid (IPA at a large beta) slows the adapter where AdamW's normalisation would not
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    # also keep the adapter after these steps (`out`/along/step-N), for evaluate.along
    save_at: list[int] = []
    out: str = "models/adapter"
    metrics: str = "metrics/train.json"  # the run's summary + final diagnostics (DVC metrics)
    curve: str = "metrics/train_curve.json"  # the logged steps (DVC plots); the PNG goes into `out`

    @field_validator("lora_targets")
    @classmethod
    def _targets_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one module")
        return v


class EvaluateConfig(Section):
    num_poses: int = Field(48, ge=1)
    seeds: list[int] = [0, 1, 2]
    num_inference_steps: int = Field(20, ge=1)
    pose_seed: int = 99_000  # test poses (the report): a seed range never used by sample/pretrain
    val_pose_seed: int = 98_000  # val poses (select-best, promotion): another unused range
    val_poses: int = Field(48, ge=1)
    # toy world: also animate this many of the gated set's own driving poses (the train-pose side
    # of the train / held-out gap; 0 = none)
    train_poses: int = Field(0, ge=0)
    # toy world: also evaluate the adapters train.save_at kept (`eval/along/step-N`, aligned only)
    along: bool = False
    shards: int = Field(1, ge=1)  # independent evaluation shards (KFP: one GPU pod each, then merge-evaluations)
    workers: int = Field(1, ge=1)  # DVC: processes evaluating the shards at once (1: one process, no shards)
    out: str = "eval"
    metrics: str = "metrics/eval.json"
    val_metrics: str = "metrics/eval_val.json"  # cases: the val split (select-best, promotion); `metrics` = test


class TrackingConfig(Section):
    enabled: bool = True
    # None: local SQLite store under .ipa/ (env MLFLOW_TRACKING_URI wins)
    uri: str | None = None
    experiment: str = "ipa-align"
    registered_model: str = "ipa-animator"
    alias: str = "champion"
    max_retries: int = Field(3, ge=0)  # tries after the first, for an unreachable server
    request_timeout_s: int = Field(10, ge=1)  # per HTTP request to a tracking server
    register_out: str = "models/registered.json"  # `ipa register` record: name, version, run


class PromoteRule(Section):
    """Promote iff `primary_metric` beats the reference by `margin` and no metric in
    `tolerances` falls further behind than its tolerance (directions from the metric registry)."""

    # an independent judge: ground truth the gate never selected on (not its scorer's hand_quality)
    primary_metric: str = "hand_psnr"
    margin: float = Field(0.1, ge=0.0)  # candidate must beat champion by this much (dB for hand_psnr)
    # allowed regressions of global metrics (absolute)
    tolerances: dict[str, float] = {"psnr": 1.0, "ssim": 0.02}

    @field_validator("primary_metric")
    @classmethod
    def _ranked_metric(cls, v: str) -> str:
        return _directed_metric(v)

    @field_validator("tolerances")
    @classmethod
    def _tolerated_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        for k, tol in v.items():
            _directed_metric(k)
            if tol < 0:
                raise ValueError(f"{k}: a tolerance is a non-negative amount, got {tol}")
        return v


def _cases_rule() -> PromoteRule:
    """Cases: ranked by a ground-truth metric of the self-reenactment val cases, never by the
    detector that selected the training data (its numbers are tolerated, not ranked on)."""
    return PromoteRule(primary_metric="hand_ssim", margin=0.0,
                       tolerances={"ssim": 0.02, "psnr": 1.0, "hand_keypoint_error": 0.05})


class PromoteConfig(PromoteRule):
    """The toy world's rule at the top level; `cases` is the rule on real cases (data.cases)."""

    cases: PromoteRule = Field(default_factory=_cases_rule)
    out: str = "metrics/promotion.json"  # the decision `ipa promote` made (DVC output)
    lock_timeout_s: float = Field(60.0, gt=0)  # wait this long for a concurrent promotion
    lock_stale_s: float = Field(600.0, gt=0)  # a lock older than this was left by a crash


def _directed_metric(name: str) -> str:
    """`name` must be a metric of the registry with a better direction (it ranks models)."""
    from ipa_lib.core.metrics import METRICS

    m = METRICS.get(name)
    if m is None or m.higher_is_better is None:
        ranked = ", ".join(k for k, d in METRICS.items() if d.higher_is_better is not None)
        raise ValueError(f"{name!r} is not a metric that ranks models (known: {ranked})")
    return name


# the tasks of the KFP round (pipelines/ipa_round.py), and their pod timeouts by default
PIPELINE_TASKS = ("resolve-params", "sample-shard", "merge-shards", "gate", "train", "evaluate", "evaluate-shard",
                  "merge-evaluations", "select-best", "register", "decide-promotion", "promote", "record-failure")
DEFAULT_TASK_TIMEOUT_S = {
    "resolve-params": 600, "sample-shard": 6 * 3600, "merge-shards": 3600, "gate": 2 * 3600, "train": 24 * 3600, "evaluate": 6 * 3600,
    "evaluate-shard": 6 * 3600, "merge-evaluations": 3600,
    "select-best": 1800, "register": 3600, "decide-promotion": 1800, "promote": 1800, "record-failure": 600,
}


class PipelineConfig(Section):
    image: str = "ghcr.io/ipa-align/ipa-runtime:0.1.0"
    gpu_image: str = "ghcr.io/ipa-align/ipa-runtime:0.1.0-cuda12.8"
    betas: list[float] = [200.0, 600.0, 2000.0]
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = Field(1, ge=1)
    node_selector: dict[str, str] = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    gpu_toleration_key: str = "nvidia.com/gpu"
    namespace: str = "ipa-align"  # where pipeline pods run (k8s/ kustomize namespace)
    mlflow_service: str = "mlflow"  # in-cluster MLflow tracking Service (k8s/base)
    pvc_name: str = "ipa-workspace"
    mount_path: str = "/workspace"
    mlflow_secret: str = "ipa-mlflow"
    cpu_request: str = "4"
    cpu_limit: str = "8"
    memory_request: str = "32Gi"
    memory_limit: str = "64Gi"
    train_retries: int = Field(2, ge=0)
    shm_size_limit: str = "16Gi"  # in-memory emptyDir at /dev/shm of training pods (counts as memory)
    service_account: str = "ipa-pipeline"  # runs are submitted with it (k8s/base/serviceaccounts.yaml)
    # train on CPU as well (the dev overlay has no GPUs): `image` for every task, no GPU
    # request, node selector or GPU toleration
    cpu_only: bool = False
    image_pull_secrets: list[str] = []  # Secrets in the namespace for a private registry, on every task
    # multi-node training (ipa_lib/orchestration/trainjob.py): train_nodes > 1 makes the train task
    # submit a Kubeflow Trainer TrainJob (or a training-operator PyTorchJob) of that many nodes,
    # accelerator_limit GPUs (= processes) each, and wait up to train_job_timeout_s for it
    train_nodes: int = Field(1, ge=1)
    train_operator: Literal["trainjob", "pytorchjob"] = "trainjob"
    train_runtime: str = "torch-distributed"  # the ClusterTrainingRuntime a TrainJob references
    train_job_timeout_s: int = Field(86400, ge=1)
    train_job_poll_s: float = Field(15.0, gt=0)
    # per task: the pod's activeDeadlineSeconds (each retry its own); tasks not named keep the default
    task_timeout_s: dict[str, int] = dict(DEFAULT_TASK_TIMEOUT_S)

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit", "shm_size_limit", mode="before")
    @classmethod
    def _quantity(cls, v):
        """Kubernetes quantities: `--set pipeline.cpu_limit=2` (a YAML number) means "2"."""
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("task_timeout_s")
    @classmethod
    def _timeouts(cls, v: dict[str, int]) -> dict[str, int]:
        for task, seconds in v.items():
            if task not in PIPELINE_TASKS:
                raise ValueError(f"{task!r} is not a task of the pipeline (tasks: {', '.join(PIPELINE_TASKS)})")
            if seconds < 1:
                raise ValueError(f"{task}: a timeout is a positive number of seconds, got {seconds}")
        return {**DEFAULT_TASK_TIMEOUT_S, **v}

    @field_validator("betas")
    @classmethod
    def _betas_positive(cls, v: list[float]) -> list[float]:
        if not v or any(b <= 0 for b in v):
            raise ValueError(f"must be a non-empty list of positive numbers, got {v}")
        if len(set(v)) != len(v):  # one training run per beta: select-best pairs runs by beta
            raise ValueError(f"must not repeat a value, got {v}")
        return v


class Params(Section):
    toy: ToyConfig = ToyConfig()
    model: ModelConfig = ModelConfig()
    backend: BackendConfig = BackendConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sample: SampleConfig = SampleConfig()
    gate: GateConfig = GateConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    promote: PromoteConfig = PromoteConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if self.gate.min_kept > self.gate.top_k:
            raise ValueError(f"gate.min_kept ({self.gate.min_kept}) > gate.top_k ({self.gate.top_k})")
        if self.on_cases and self.gate.scorer == "toy":
            raise ValueError("gate.scorer=toy scores toy clips only; cases (backend.name=wan-animate) need mediapipe (or auto)")
        return self

    @property
    def on_cases(self) -> bool:
        """True when the round runs on real cases (`data.cases`: backend.name wan-animate),
        False on the embedded toy world (backend.name toy)."""
        return self.backend.name != "toy"

    @property
    def gate_scorer(self) -> str:
        """The scorer the gate runs: `gate.scorer`, with auto resolved by the world."""
        if self.gate.scorer != "auto":
            return self.gate.scorer
        return "mediapipe" if self.on_cases else "toy"

    @property
    def promote_rule(self) -> PromoteRule:
        """The promotion rule of this world: `promote.cases` on cases, `promote` on the toy world."""
        return self.promote.cases if self.on_cases else self.promote


def _format_errors(path: str, err: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(data: dict, source: str = "<params>") -> Params:
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read and validate `params.yaml`; `overrides` are `dotted.key=value` strings (YAML values)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item, str(path))
    return parse_params(data, str(path))


def apply_override(data: dict, item: str, source: str = "<override>") -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 600, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"{source}: override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override {key!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def flatten(params: Params) -> dict[str, object]:
    """Dotted keys -> values, for MLflow params and KFP pipeline parameters."""
    out: dict[str, object] = {}

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = obj

    walk("", params.model_dump(mode="json"))
    return out
