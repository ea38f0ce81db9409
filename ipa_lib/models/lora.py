"""LoRA for any backend: add adapters with peft, run the frozen reference, save/load in diffusers' format.

Backend-agnostic: works on any `torch.nn.Module` (a diffusers transformer in practice).

- `add_lora` injects a peft `LoraConfig` adapter in place (the module keeps its class and
  forward signature) and refuses target names that match no module.
- `disabled_adapters` is the reference model: the same weights with every LoRA layer off,
  no second copy; the previous state (and `requires_grad` flags) is restored in `finally`.
- `save_lora` writes `pytorch_lora_weights.safetensors` with keys `<prefix>.<module>.lora_A.weight`
  and the adapter's `LoraConfig` in the safetensors metadata under `lora_adapter_metadata`,
  which is what `DiffusionPipeline.save_lora_weights` writes and `pipe.load_lora_weights(path)`
  reads (rank and alpha included, so alpha != rank survives the round trip).
- `load_lora` reads that file back into a module (adding the adapter if it has none) and
  fails on any key that does not land.

peft reference: https://huggingface.co/docs/peft (LoraConfig, inject_adapter_in_model,
get_peft_model_state_dict, set_peft_model_state_dict).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

ADAPTER_NAME = "default"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_CONFIG_ATTR = "_ipa_lora_config"

__all__ = [
    "add_lora", "disabled_adapters", "save_lora", "load_lora", "lora_parameters",
    "has_lora", "match_targets", "WEIGHT_NAME",
]


def _lora_layers(module: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def has_lora(module: torch.nn.Module) -> bool:
    return bool(_lora_layers(module))


@torch.no_grad()
def adapter_norm(module: torch.nn.Module) -> float:
    """sqrt(sum over LoRA layers and adapters of ||scaling * B @ A||_F^2): the size of the weight
    change the adapter makes (0 at init, B = 0), not of its raw A, B matrices."""
    total = 0.0
    for layer in _lora_layers(module):
        for name in layer.lora_A:
            a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
            total += float((layer.scaling[name] * (b @ a)).pow(2).sum())
    return total ** 0.5


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter weights (what the optimizer trains)."""
    return [p for n, p in module.named_parameters() if "lora_" in n]


def match_targets(module: torch.nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """Target name -> module names it matches (peft's rule: the full name or a `.`-suffix)."""
    names = [n for n, _ in module.named_modules() if n]
    return {t: [n for n in names if n == t or n.endswith("." + t)] for t in targets}


def linear_suffixes(module: torch.nn.Module) -> list[str]:
    """Distinct short names of the Linear layers (`to_q`, `to_out.0`, `net.2`): valid targets."""
    out = set()
    for n, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and n:
            parts = n.split(".")
            out.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(out)


def add_lora(module: torch.nn.Module, rank: int, alpha: int, targets: list[str], *, dropout: float = 0.0) -> torch.nn.Module:
    """Inject a LoRA adapter into `module` in place and return it; only adapter weights train.

    Raises ValueError naming every target that matches no module (peft itself only fails
    when *none* match, so a typo in one name would silently train less than asked).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1 or alpha < 1:
        raise ValueError(f"LoRA rank and alpha must be >= 1, got rank={rank}, alpha={alpha}")
    if not targets:
        raise ValueError("LoRA targets are empty: name at least one module (e.g. to_q, to_k, to_v)")
    if has_lora(module):
        raise ValueError(f"{type(module).__name__} already has a LoRA adapter")
    matched = match_targets(module, list(targets))
    missing = [t for t, hits in matched.items() if not hits]
    if missing:
        raise ValueError(
            f"LoRA target(s) {missing} match no module of {type(module).__name__}; "
            f"its Linear layers are named like: {linear_suffixes(module)[:24]}"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, init_lora_weights=True)
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # e.g. a target that is not a Linear/Conv layer
        raise ValueError(f"LoRA targets {list(targets)} could not be adapted: {err}") from None
    module.requires_grad_(False)
    for p in lora_parameters(module):
        p.requires_grad_(True)
    setattr(module, _CONFIG_ATTR, config)
    return module


@contextmanager
def disabled_adapters(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` as the frozen starting model: every LoRA layer off, restored on exit.

    peft's `enable_adapters` also flips `requires_grad` of the adapter weights; the flags
    are recorded and put back as they were, so a frozen (inference) adapter stays frozen.
    """
    layers = _lora_layers(module)
    was_disabled = [layer.disable_adapters for layer in layers]
    grads = [(p, p.requires_grad) for p in lora_parameters(module)]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, off in zip(layers, was_disabled):
            layer.enable_adapters(not off)
        for p, flag in grads:
            p.requires_grad_(flag)


def _config_dict(module: torch.nn.Module) -> dict:
    config = getattr(module, _CONFIG_ATTR, None)
    if config is None:
        peft_config = getattr(module, "peft_config", None)
        if isinstance(peft_config, dict) and ADAPTER_NAME in peft_config:
            config = peft_config[ADAPTER_NAME]
    if config is None:
        raise ValueError(f"{type(module).__name__} has no LoRA adapter to save (call add_lora first)")
    out = {}
    for k, v in config.to_dict().items():
        out[k] = sorted(v) if isinstance(v, set) else v
    return out


def save_lora(module: torch.nn.Module, path: str | Path, prefix: str = "transformer") -> Path:
    """Write the adapter to `path/pytorch_lora_weights.safetensors` in diffusers' LoRA format.

    Keys: `<prefix>.<module path>.lora_{A,B}.weight`; metadata: `{prefix}.{LoraConfig field}`
    as JSON under `lora_adapter_metadata` (what `save_lora_weights(..., transformer_lora_adapter_metadata=)`
    writes). Returns the file written.
    """
    import safetensors.torch
    from peft.utils import get_peft_model_state_dict

    config = _config_dict(module)
    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    if not state:
        raise ValueError(f"{type(module).__name__} has no LoRA weights to save")
    tensors = {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = path / WEIGHT_NAME
    safetensors.torch.save_file(tensors, str(out), metadata=metadata)
    return out


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {path} (expected a folder with {WEIGHT_NAME} or the file itself)")
    return path


def read_lora(path: str | Path, prefix: str = "transformer") -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict without `prefix.`, LoraConfig kwargs) from a file written by `save_lora`."""
    import safetensors
    import safetensors.torch

    file = _resolve(path)
    with safetensors.safe_open(str(file), framework="pt") as f:
        raw_meta = (f.metadata() or {}).get(METADATA_KEY)
    tensors = safetensors.torch.load_file(str(file))
    head = prefix + "."
    state = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
    if not state:
        found = sorted({k.split(".", 1)[0] for k in tensors})
        raise ValueError(f"{file}: no keys start with {head!r} (found prefixes {found})")
    meta = {}
    if raw_meta:
        meta = {k[len(head):]: v for k, v in json.loads(raw_meta).items() if k.startswith(head)}
    return state, meta


def load_lora(module: torch.nn.Module, path: str | Path, prefix: str = "transformer") -> torch.nn.Module:
    """Load adapter weights written by `save_lora` (or diffusers' `save_lora_weights`) into `module`.

    Adds the adapter first when `module` has none (rank/alpha/targets from the file's metadata,
    else rank from the weight shapes and alpha = rank). Raises ValueError when any saved key
    does not land in the module or any adapter weight of the module stays unloaded.
    """
    from peft.utils import set_peft_model_state_dict

    state, meta = read_lora(path, prefix)
    if not has_lora(module):
        if meta:
            rank, alpha, targets = int(meta["r"]), int(meta.get("lora_alpha", meta["r"])), list(meta["target_modules"])
        else:
            a = next(v for k, v in state.items() if "lora_A" in k)
            rank = alpha = int(a.shape[0])
            targets = sorted({k.split(".lora_")[0] for k in state})
        add_lora(module, rank, alpha, targets)
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"{path}: LoRA keys do not match {type(module).__name__}: "
            f"{len(unexpected)} saved keys found no layer (e.g. {unexpected[:3]}), "
            f"{len(missing)} adapter weights were not in the file (e.g. {missing[:3]})"
        )
    return module


def merge_lora(module: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the base weights and remove the LoRA layers (in place).

    Used to start a new round from an aligned model: the merged network becomes the new
    frozen reference, and a fresh adapter can be added on top.
    """
    from peft.tuners.lora import LoraLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):
            sub.merge(adapter_names=[ADAPTER_NAME])
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, sub.get_base_layer())
    for attr in (_CONFIG_ATTR, "peft_config"):
        if hasattr(module, attr):
            delattr(module, attr)
    return module
