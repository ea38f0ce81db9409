"""Training-step benchmark: SFT vs IPA vs Diffusion-DPO on one model and batch, and the
reference model by adapter-disable vs by deep copy. Writes JSON.

One step = what one process of `ipa train` does per step (`ipa_lib.stages.train.train`):
`compute_loss` (VAE encode, conditioning, t/noise draw, policy and reference forwards, loss)
under the run's accelerator (`make_accelerator`: autocast), backward, gradient clipping at
`train.max_grad_norm`, AdamW (`train.lr`, no weight decay) on the LoRA weights; the speed
settings `train.compile` / `train.checkpoint_blocks` applied by `ipa_lib.models.speed`, as
`train` applies them (`--compile`, `--checkpoint-layers`). Modes:
    sft       policy forward + backward                                  (~3 forward-equivalents)
    ipa       + one no-grad reference forward, adapters disabled         (~4)
    ipa_copy  IPA with the reference as a frozen deep copy of the model  (~4, + a copy of the weights)
    dpo       Diffusion-DPO on (winner, loser): 2 policy + 2 reference    (~8)
All modes train on the same B clips (DPO: the same B winners plus B losers), same LoRA.

Models:
    toy              ipa_lib's toy backend (diffusers WanTransformer3DModel, pixel latents 5x32x32)
    wan-animate-tiny the tiny random WanAnimatePipeline of ipa_lib.models.wan_tiny (17x32x32 clips)
    wan-1.3b         a Wan2.1/2.2-1.3B-shaped WanTransformer3DModel (30 layers, 12 heads x 128,
                     ffn 8960, 36 input / 16 output channels, 512 text tokens of 4096), random
                     bf16 weights, latents 21x60x104 (81 frames at 480x832); GPU only

FLOPs: model FLOPs of one forward counted by torch's FlopCounterMode (matmuls, convs and
GPU attention; CPU attention kernels are not counted), also an analytic count for the Wan
transformers; a step is charged 3x forward (SFT), 4x (IPA), 8x (DPO): backward = 2x
forward, gradient-checkpoint recomputation is *not* counted (standard MFU). MFU = achieved
model FLOP/s over the card's dense bf16 peak (--peak-tflops, H100 SXM: 989).

Time: the modes run interleaved round-robin in one process (a shared machine's load drift
hits every mode alike); the median step is reported.

Memory: on GPU the allocator's peak (torch.cuda.max_memory_allocated) over the timed steps;
on CPU each (model, mode) runs 2 steps in its own process and reports its peak resident-set
growth over the process's post-import baseline (sampled every 2 ms), plus the bytes autograd saves
for backward (saved-tensor hooks), which is exact and device-independent.

Reproduce:
    python benchmarks/train_step.py --device cpu  --out benchmarks/results/train_step_cpu.json
    python benchmarks/train_step.py --device cuda --out benchmarks/results/train_step_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("sft", "ipa", "ipa_copy", "dpo")
FORWARDS_PER_STEP = {"sft": 3, "ipa": 4, "ipa_copy": 4, "dpo": 8}
WAN_13B = dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
               in_channels=36, out_channels=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2))


# ---------------------------------------------------------------- a bare-transformer backend


class RawWanBackend:
    """AnimationBackend over a bare `WanTransformer3DModel` whose batch already holds latents.

    `video` is x0 (B, 16, f, h, w); conditioning = random text embeddings and 20 channels of
    image-to-video conditioning latents, concatenated like Wan I2V / Animate (36 channels).
    """

    name = "raw-wan"

    def __init__(self, transformer, device, dtype, text_len: int = 512):
        from ipa_lib.models import lora

        self._lora = lora
        self.transformer = transformer
        self.device, self.dtype, self.text_len = torch.device(device), dtype, text_len
        self.cond_channels = transformer.config.in_channels - transformer.config.out_channels

    def encode(self, video):
        return video.to(self.device, torch.float32)

    def decode(self, latents):
        return latents

    def condition(self, batch):
        g = torch.Generator(device=self.device).manual_seed(1)
        B, _, f, h, w = batch["video"].shape
        c = self.transformer.config
        return {
            "text": torch.randn(B, self.text_len, c.text_dim, generator=g, device=self.device, dtype=self.dtype),
            "y": torch.randn(B, self.cond_channels, f, h, w, generator=g, device=self.device, dtype=self.dtype),
        }

    def predict_velocity(self, x_t, t, cond):
        hidden = torch.cat([x_t.to(self.dtype), cond["y"]], dim=1)
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        with ctx:
            out = self.transformer(hidden, timestep=t * 1000.0, encoder_hidden_states=cond["text"], return_dict=False)[0]
        return out.to(x_t.dtype)

    def mask_to_latent(self, hand_mask):
        return hand_mask.to(self.device, torch.float32)  # the benchmark's masks are on the latent grid

    def add_lora(self, rank, alpha, targets):
        self._lora.add_lora(self.transformer, rank, alpha, targets)
        for p in self._lora.lora_parameters(self.transformer):
            p.data = p.data.float()

    def reference_model(self):
        return self._lora.disabled_adapters(self.transformer)


def _set_transformer(backend, module) -> None:
    if hasattr(backend, "pipe"):
        vars(backend.pipe)["transformer"] = module  # WanAnimateBackend.transformer reads pipe.transformer
    else:
        backend.transformer = module


class CopyReference:
    """The same backend, but `reference_model()` runs a frozen deep copy of the starting model."""

    def __init__(self, inner):
        from ipa_lib.models.lora import _lora_layers

        self._inner = inner
        self._copy = copy.deepcopy(inner.transformer).requires_grad_(False)
        for layer in _lora_layers(self._copy):
            layer.enable_adapters(False)
        self._copy.requires_grad_(False)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @contextmanager
    def reference_model(self):
        policy = self._inner.transformer
        _set_transformer(self._inner, self._copy)
        try:
            yield
        finally:
            _set_transformer(self._inner, policy)


# ---------------------------------------------------------------- models and batches


def build(model: str, device: torch.device, args) -> tuple[object, dict, dict]:
    """(backend with LoRA, batch with winner and loser clips, info)."""
    from ipa_lib.core.config import BackendConfig, ModelConfig
    from ipa_lib.models.speed import apply_speed_settings, speed_summary

    tcfg = train_config(model, args)
    g = torch.Generator().manual_seed(0)
    if model == "toy":
        from ipa_lib.models.toy import ToyBackend, build_transformer

        be = ToyBackend(build_transformer(ModelConfig()), device=device)
        B, F, S = args.batch or 8, 5, 32
        batch = _pixel_batch(B, F, S, g)
        info = {"clip": f"{F}x{S}x{S} pixels", "latent": [3, F, S, S]}
    elif model == "wan-animate-tiny":
        from ipa_lib.models.wan_animate import WanAnimateBackend
        from ipa_lib.models.wan_tiny import TINY_FRAMES, TINY_SIZE

        cfg = BackendConfig(name="wan-animate", device=str(device), dtype="float32")
        be = WanAnimateBackend.tiny(cfg)
        B, F, S = args.batch or 2, TINY_FRAMES, TINY_SIZE
        batch = _pixel_batch(B, F, S, g)
        info = {"clip": f"{F}x{S}x{S} pixels", "latent": [16, 1 + (F - 1) // 4, S // 8, S // 8]}
    elif model == "wan-1.3b":
        from diffusers import WanTransformer3DModel

        from ipa_lib.models.wan_animate import cast_keeping_fp32

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: quick checks only
        shape = {**WAN_13B, "num_layers": args.layers or WAN_13B["num_layers"]}
        with torch.device(device):
            tr = WanTransformer3DModel(**shape, rope_max_seq_len=1024)
        cast_keeping_fp32(tr, dtype)  # as from_pretrained(dtype=bf16): rope, norms, time embedder stay fp32
        tr.eval().requires_grad_(False)
        be = RawWanBackend(tr, device, dtype)
        f, h, w = args.latent
        B = args.batch or 1
        batch = {
            "video": torch.randn(B, 16, f, h, w, generator=g),
            "video_lose": torch.randn(B, 16, f, h, w, generator=g),
            "hand_mask": (torch.rand(B, f, h, w, generator=g) > 0.9).float(),
        }
        batch["hand_mask_lose"] = batch["hand_mask"]
        info = {"clip": f"{4 * (f - 1) + 1} frames at {8 * h}x{8 * w} (latent {f}x{h}x{w})", "latent": [16, f, h, w],
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()}, "dtype": str(dtype)}
    else:
        raise SystemExit(f"unknown model {model!r}")
    torch.manual_seed(tcfg.seed)  # as `train`: add_lora, then the speed settings
    be.add_lora(tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_targets)
    speed = apply_speed_settings(be, tcfg)
    tr = be.transformer
    info.update(
        checkpointed_blocks=speed_summary(tr)["checkpointed"], compiled=speed["compiled"],
        batch=B,
        base_params=sum(p.numel() for n, p in tr.named_parameters() if "lora_" not in n),
        lora_params=sum(p.numel() for n, p in tr.named_parameters() if "lora_" in n),
        lora=dict(rank=tcfg.lora_rank, alpha=tcfg.lora_alpha, targets=tcfg.lora_targets),
    )
    return be, {k: v.to(device) for k, v in batch.items()}, info


def _pixel_batch(B, F, S, g) -> dict:
    from ipa_lib.models.wan_tiny import tiny_batch

    win = tiny_batch(B, F, S, seed=0)
    lose = tiny_batch(B, F, S, seed=1)
    return {**win, "video_lose": lose["video"], "hand_mask_lose": win["hand_mask"]}


def train_config(model: str, args, **changes):
    """The TrainConfig a step runs with: defaults, `--compile`, and `--checkpoint-layers` on
    wan-1.3b (the toy and tiny models keep every activation unless --compile/ckpt ask)."""
    from ipa_lib.core.config import TrainConfig

    speed = {"compile": bool(getattr(args, "compile", False)),
             "checkpoint_blocks": args.checkpoint_layers if model == "wan-1.3b" else 0}
    return TrainConfig(**{**speed, **changes})


# ---------------------------------------------------------------- FLOPs


def forward_flops(backend, batch) -> int:
    """Model FLOPs of one policy forward on `batch` (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    x0 = backend.encode(batch["video"])
    cond = backend.condition(batch)
    t = torch.full((x0.shape[0],), 0.5, device=x0.device)
    with torch.no_grad():
        backend.predict_velocity(x0, t, cond)  # warm-up outside the counter (lazy inits)
        counter = FlopCounterMode(display=False)
        with counter:
            backend.predict_velocity(x0, t, cond)
    return int(counter.get_total_flops())


def analytic_wan_flops(cfg: dict, B: int, f: int, h: int, w: int, text_len: int) -> int:
    """Forward matmul + attention FLOPs of a Wan transformer (2 FLOPs per multiply-add)."""
    pt, ph, pw = cfg["patch_size"]
    N = (f // pt) * (h // ph) * (w // pw)
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    per_layer = (
        8 * N * d * d + 4 * N * N * d  # self-attention: q, k, v, out; QK^T and AV
        + 4 * N * d * d + 4 * text_len * d * d + 4 * N * text_len * d  # cross-attention to text
        + 4 * N * d * cfg["ffn_dim"]  # feed-forward
    )
    embed = 2 * N * cfg["in_channels"] * pt * ph * pw * d + 2 * text_len * (cfg["text_dim"] * d + d * d)
    head = 2 * N * d * cfg["out_channels"] * pt * ph * pw
    return B * (cfg["num_layers"] * per_layer + embed + head)


# ---------------------------------------------------------------- memory


class RSSPeak:
    """Peak resident-set size of this process, sampled every 2 ms in a thread (CPU runs)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@contextmanager
def saved_bytes(acc: dict):
    """Sum the bytes of distinct storages autograd saves for backward (activations)."""
    seen: set = set()

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                acc["bytes"] = acc.get("bytes", 0) + t.untyped_storage().nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- steps


class Stepper:
    """One training step of `mode`, as one process of `ipa_lib.stages.train.train` runs it
    (accelerator autocast, compute_loss, backward, clip_grad_norm_, AdamW), its own optimizer."""

    def __init__(self, backend, batch: dict, mode: str):
        from ipa_lib.core.config import TrainConfig
        from ipa_lib.models.lora import lora_parameters
        from ipa_lib.stages.train import make_accelerator

        self.mode = mode
        self.cfg = TrainConfig(loss="ipa" if mode == "ipa_copy" else mode)
        self.be = CopyReference(backend) if mode == "ipa_copy" else backend
        self.accelerator = make_accelerator(self.cfg, backend)
        self.params = lora_parameters(backend.transformer)
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=0.0)
        self.batch = dict(batch)
        if mode != "dpo":
            self.batch.pop("video_lose", None)
            self.batch.pop("hand_mask_lose", None)
        self.i = 0

    def __call__(self, acc: dict | None = None) -> float:
        from ipa_lib.stages.train import compute_loss, step_generator

        gen = step_generator(self.cfg.seed, self.i)
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        with saved_bytes(acc) if acc is not None else nullcontext():
            with self.accelerator.autocast():
                loss, _ = compute_loss(self.be, self.batch, self.cfg, gen)
        value = loss.item()
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        return value

    def copy_mb(self) -> float | None:
        if self.mode != "ipa_copy":
            return None
        return round(sum(p.numel() * p.element_size() for p in self.be._copy.parameters()) / 2**20, 2)

    def close(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.be = self.opt = None


def time_modes(backend, batch, modes, steps: int, warmup: int, device) -> dict:
    """Median step time per mode, the modes interleaved round-robin so load drift hits all alike."""
    steppers = {m: Stepper(backend, batch, m) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for m, st in steppers.items():
        for _ in range(warmup):
            st()
    for _ in range(steps):
        for m, st in steppers.items():
            _sync(device)
            t0 = time.perf_counter()
            st()
            _sync(device)
            times[m].append(time.perf_counter() - t0)
    for st in steppers.values():
        st.close()
    return {m: {"step_s": statistics.median(ts), "step_s_all": [round(x, 5) for x in ts]} for m, ts in times.items()}


def memory_mode(backend, batch, mode: str, device, steps: int = 2) -> dict:
    """Peak memory of `steps` steps of one mode (GPU: allocator peak; CPU: RSS, see module doc)."""
    st = Stepper(backend, batch, mode)
    acc: dict = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss = RSSPeak() if device.type == "cpu" else nullcontext()
    with rss:
        st(acc)
        for _ in range(steps - 1):
            st()
        _sync(device)
    out = {"saved_activations_mb": round(acc.get("bytes", 0) / 2**20, 2)}
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        out["rss_peak_mb"] = round(rss.peak / 2**20, 1)
    if mode == "ipa_copy":
        out["reference_copy_mb"] = st.copy_mb()
    st.close()
    del st
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- drivers


def machine(device: torch.device) -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        import diffusers
        import peft

        info.update(diffusers=diffusers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                    cuda=torch.version.cuda)
    return info


def summarise(model: str, info: dict, results: dict, fwd_flops: int, device, peak_tflops: float | None) -> dict:
    f = info["latent"]
    tokens_per_clip = None
    if model in ("wan-1.3b", "wan-animate-tiny"):
        # Wan patch (1, 2, 2); wan-animate adds the reference slot frame
        extra = 1 if model == "wan-animate-tiny" else 0
        tokens_per_clip = (f[1] + extra) * (f[2] // 2) * (f[3] // 2)
    elif model == "toy":
        tokens_per_clip = f[1] * (f[2] // 4) * (f[3] // 4)
    for mode, r in results.items():
        if "step_s" not in r:
            continue
        flops = FORWARDS_PER_STEP[mode] * fwd_flops
        clips = info["batch"] * (2 if mode == "dpo" else 1)
        r["model_tflop_per_step"] = round(flops / 1e12, 4)
        r["achieved_tflops"] = round(flops / r["step_s"] / 1e12, 4)
        r["tokens_per_s"] = round(clips * tokens_per_clip / r["step_s"], 1)
        r["clips_per_s"] = round(clips / r["step_s"], 3)
        if peak_tflops:
            r["mfu"] = round(flops / r["step_s"] / (peak_tflops * 1e12), 4)
    ok = {m: r for m, r in results.items() if "step_s" in r}
    ratios = {}
    if "ipa" in ok and "sft" in ok:
        ratios["ipa_over_sft_time"] = round(ok["ipa"]["step_s"] / ok["sft"]["step_s"], 3)
    if "ipa" in ok and "dpo" in ok:
        ratios["ipa_over_dpo_time"] = round(ok["ipa"]["step_s"] / ok["dpo"]["step_s"], 3)
    if "ipa" in ok and "ipa_copy" in ok:
        ratios["ipa_copy_over_ipa_time"] = round(ok["ipa_copy"]["step_s"] / ok["ipa"]["step_s"], 3)
    key = "peak_mem_mb" if device.type == "cuda" else "rss_peak_mb"
    if "ipa" in ok and "sft" in ok:
        ratios["ipa_mem_over_policy_alone"] = round(ok["ipa"][key] / ok["sft"][key], 4)
    if "ipa_copy" in ok and "sft" in ok:
        ratios["ipa_copy_mem_over_policy_alone"] = round(ok["ipa_copy"][key] / ok["sft"][key], 4)
    return {"model": model, **info, "forward_tflop": round(fwd_flops / 1e12, 6), "modes": results, "ratios": ratios}


def pick_attention(be, batch, device, choices=("default", "cudnn")) -> tuple[str, dict]:
    """Time 2 IPA steps under each SDPA backend; the fastest that runs wins."""
    timings = {}
    for name in choices:
        try:
            with _attention(name):
                timings[name] = time_modes(be, batch, ["ipa"], 2, 1, device)["ipa"]["step_s"]
        except Exception as err:  # a backend the card or shape does not support
            timings[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            torch.cuda.empty_cache()
    ok = {k: v for k, v in timings.items() if isinstance(v, float)}
    return min(ok, key=ok.get), timings


def bench(model, device, args) -> dict:
    be, batch, info = build(model, device, args)
    if args.attention == "auto":
        args.attention, info["attention_trial_s"] = pick_attention(be, batch, device)
        print(f"  attention: {args.attention} {info['attention_trial_s']}", flush=True)
    info["attention"] = args.attention
    with _attention(args.attention):
        return _bench(model, be, batch, info, device, args)


def _bench(model, be, batch, info, device, args) -> dict:
    fwd = forward_flops(be, batch)
    if model == "wan-1.3b":
        f, h, w = args.latent
        shape = {**WAN_13B, "num_layers": args.layers or WAN_13B["num_layers"]}
        info["forward_tflop_analytic"] = round(analytic_wan_flops(shape, info["batch"], f, h, w, 512) / 1e12, 4)
    results: dict[str, dict] = {m: {} for m in args.modes}
    # 1. memory, one mode at a time (CPU: each in a fresh process)
    for mode in args.modes:
        try:
            if device.type == "cuda":
                results[mode].update(memory_mode(be, batch, mode, device))
            else:
                results[mode].update(memory_child(model, mode, args))
        except torch.cuda.OutOfMemoryError as err:
            results[mode]["error"] = f"out of memory: {str(err).splitlines()[0]}"
            torch.cuda.empty_cache()
        print(f"  {model:17s} {mode:9s} memory {json.dumps(results[mode])}", flush=True)
    # 2. time, all modes interleaved in this process
    ok = [m for m in args.modes if "error" not in results[m]]
    for mode, r in time_modes(be, batch, ok, args.steps, args.warmup, device).items():
        results[mode].update(r)
        print(f"  {model:17s} {mode:9s} time {r['step_s']:.4f} s", flush=True)
    report = summarise(model, info, results, fwd, device, args.peak_tflops if device.type == "cuda" else None)
    if args.variants and model == "wan-1.3b":
        report["variants"] = run_variants(be, batch, info, fwd, device, args)
    return report


def run_variants(be, batch, info, fwd, device, args) -> list[dict]:
    """Extra settings on the same model and batch: `attention=cudnn;ckpt=15;compile=1;modes=ipa+sft`
    (ckpt = train.checkpoint_blocks, compile = train.compile)."""
    from ipa_lib.models.speed import configure_blocks, speed_summary

    out, start = [], time.time()
    for spec in args.variants:
        if time.time() - start > args.variant_budget_s:
            out.append({"variant": spec, "skipped": f"over --variant-budget-s {args.variant_budget_s}"})
            continue
        kv = dict(item.split("=", 1) for item in spec.split(";") if item)
        modes = kv.get("modes", "ipa").split("+")
        vcfg = train_config("wan-1.3b", args, checkpoint_blocks=int(kv.get("ckpt", args.checkpoint_layers)),
                            compile=kv.get("compile") == "1")
        configure_blocks(be.transformer, vcfg.checkpoint_blocks, vcfg.compile)
        ctx = _attention(kv.get("attention", args.attention))
        results: dict[str, dict] = {m: {} for m in modes}
        t_start = time.time()
        with ctx:
            for mode in modes:
                try:
                    results[mode].update(memory_mode(be, batch, mode, device))
                except torch.cuda.OutOfMemoryError as err:
                    results[mode]["error"] = f"out of memory: {str(err).splitlines()[0]}"
                    torch.cuda.empty_cache()
                except Exception as err:  # e.g. a compile failure: record it, go on
                    results[mode]["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    torch.cuda.empty_cache()
            ok = [m for m in modes if "error" not in results[m]]
            if ok:
                for mode, r in time_modes(be, batch, ok, args.variant_steps, 1, device).items():
                    results[mode].update(r)
        for r in results.values():
            r["variant_wall_s"] = round(time.time() - t_start, 1)
        v = summarise("wan-1.3b", {**info, "checkpointed_blocks": speed_summary(be.transformer)["checkpointed"]}, results,
                      fwd, device, args.peak_tflops)
        v = {"variant": spec, "checkpointed_blocks": v["checkpointed_blocks"], "modes": v["modes"], "ratios": v["ratios"]}
        print(f"  variant {spec}: " + ", ".join(
            f"{m} {r.get('step_s', float('nan')):.3f}s mfu {r.get('mfu', float('nan')):.3f} mem {r.get('peak_mem_mb')}"
            if "error" not in r else f"{m} {r['error'][:60]}" for m, r in v["modes"].items()), flush=True)
        out.append(v)
    base = train_config("wan-1.3b", args)
    configure_blocks(be.transformer, base.checkpoint_blocks, base.compile)
    return out


def _attention(name: str):
    if name == "default" or not torch.cuda.is_available():
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def child_main(spec: dict) -> None:
    """Memory of one (model, mode) in a fresh process, so CPU numbers do not leak between modes."""
    torch.set_num_threads(spec["threads"])
    args = argparse.Namespace(**spec["args"])
    device = torch.device("cpu")
    base = RSSPeak().rss()
    be, batch, _ = build(spec["model"], device, args)
    r = memory_mode(be, batch, spec["mode"], device)
    r["rss_peak_mb"] = round(r["rss_peak_mb"] - base / 2**20, 1)  # growth over the post-import baseline
    print("RESULT " + json.dumps(r), flush=True)


def memory_child(model: str, mode: str, args) -> dict:
    spec_args = {k: v for k, v in vars(args).items() if k != "out"}
    spec = {"model": model, "mode": mode, "threads": args.threads, "args": spec_args}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {"error": " ".join((proc.stderr or proc.stdout).strip().splitlines()[-1:])}
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------- docs


GOALS = {
    "ipa_over_sft_time": ("IPA / SFT step time", "<= 1.45", lambda x: x <= 1.45),
    "ipa_over_dpo_time": ("IPA / Diffusion-DPO step time", "<= 0.6", lambda x: x <= 0.6),
    "ipa_mem_over_policy_alone": ("IPA (adapter-disable reference) / SFT peak memory", "< 1.05", lambda x: x < 1.05),
    "ipa_copy_mem_over_policy_alone": ("IPA (deep-copy reference) / SFT peak memory", "(for contrast)", None),
    "ipa_copy_over_ipa_time": ("IPA deep-copy / adapter-disable step time", "(for contrast)", None),
}


def _fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _mode_table(res: dict, gpu: bool) -> list[str]:
    mem = "peak_mem_mb" if gpu else "rss_peak_mb"
    head = "| mode | step (s) | model TFLOP/step | TFLOP/s | " + ("MFU | " if gpu else "") + "tokens/s | " + \
        ("peak memory (MiB) |" if gpu else "peak RSS growth (MiB) |") + " autograd-saved (MiB) |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for mode, r in res["modes"].items():
        if "error" in r:
            lines.append(f"| {mode} | {r['error'][:80]} |")
            continue
        row = [mode, _fmt(r.get("step_s"), 4), _fmt(r.get("model_tflop_per_step"), 4), _fmt(r.get("achieved_tflops"), 3)]
        if gpu:
            row.append(f"{100 * r['mfu']:.1f} %" if "mfu" in r else "-")
        row += [_fmt(r.get("tokens_per_s"), 0), _fmt(r.get(mem), 1), _fmt(r.get("saved_activations_mb"), 1)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _ratio_table(res: dict) -> list[str]:
    lines = ["| ratio | measured | goal |", "| --- | --- | --- |"]
    for key, (label, goal, ok) in GOALS.items():
        if key in res["ratios"]:
            x = res["ratios"][key]
            mark = "" if ok is None else (" (met)" if ok(x) else " (**missed**)")
            lines.append(f"| {label} | {x:.3f}{mark} | {goal} |")
    return lines


def render_markdown(reports: list[dict]) -> str:
    out = [
        "# Training-step benchmarks",
        "",
        "<!-- generated by `python benchmarks/train_step.py --render benchmarks/results/*.json`; edit the script, not this file -->",
        "",
        "What one `ipa train` step costs under each objective, on the same model and batch: `compute_loss`",
        "(`ipa_lib/stages/train.py`) + backward + AdamW on the LoRA weights (rank 16 on `to_q/k/v`, `to_out.0`,",
        "`ffn.net.0.proj`, `ffn.net.2`). SFT = policy forward/backward; IPA = SFT + one no-grad reference",
        "forward with adapters disabled; IPA (copy) = the reference as a frozen deep copy of the model;",
        "Diffusion-DPO = policy and reference on the winner *and* the loser. Model FLOPs: one forward",
        "counted by torch's `FlopCounterMode`, a step charged 3x (SFT), 4x (IPA), 8x (DPO) forwards; gradient-",
        "checkpoint recomputation is not counted. Method details: the docstring of `benchmarks/train_step.py`.",
        "",
    ]
    out += ["## Summary", "", "| machine | model | IPA/SFT time | IPA/DPO time | IPA/SFT memory | copy-ref/SFT memory | IPA MFU |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for rep in reports:
        m = rep["machine"]
        for res in rep["results"]:
            r = res["ratios"]
            mfu = "-"
            if "mfu" in res["modes"].get("ipa", {}):
                best = [v["modes"]["ipa"].get("mfu", 0) for v in res.get("variants", []) if "ipa" in v["modes"]]
                for follow in rep.get("followup_runs", []):
                    for r2 in follow["results"]:
                        best += [v["modes"]["ipa"].get("mfu", 0) for v in r2.get("variants", []) if "ipa" in v["modes"]]
                mfu = f"{100 * res['modes']['ipa']['mfu']:.1f} % (best setting {100 * max(best + [0]):.1f} %)"
            out.append(f"| {m.get('gpu') or m.get('cpu', 'CPU')} | {res['model']} | {_fmt(r.get('ipa_over_sft_time'))} | "
                       f"{_fmt(r.get('ipa_over_dpo_time'))} | {_fmt(r.get('ipa_mem_over_policy_alone'))} | "
                       f"{_fmt(r.get('ipa_copy_mem_over_policy_alone'))} | {mfu} |")
    out += ["", "Goals (issue 7): IPA/SFT <= 1.45, IPA/DPO <= 0.6, adapter-disable reference < 5 % memory over the "
            "policy alone, >= 40 % MFU for the IPA step on an H100.", ""]
    for rep in reports:
        m = rep["machine"]
        gpu = "gpu" in m
        where = f"{m['gpu']} ({m.get('gpu_mem_gb')} GiB, CUDA {m.get('cuda')})" if gpu else f"{m.get('cpu', 'CPU')}, {rep['settings'].get('threads')} thread(s)"
        out += [f"## {'GPU' if gpu else 'CPU'}: {where}", ""]
        out += [f"Reproduce: `{rep['command']}`  ",
                f"Machine: torch {m['torch']}, diffusers {m.get('diffusers')}, peft {m.get('peft')}, Python {m['python']}, "
                f"{m.get('cpu_count')} CPU cores ({m.get('cpu', '?')}). "
                f"{rep['settings']['steps']} timed steps per mode after {rep['settings']['warmup']} warm-up, median; "
                f"modes interleaved round-robin.", ""]
        if gpu:
            out += [f"MFU against a dense bf16 peak of {rep['settings']['peak_tflops_bf16']:.0f} TFLOP/s (H100 SXM datasheet).", ""]
        for res in rep["results"]:
            ck = res.get("checkpointed_blocks")
            desc = f"### {res['model']}: {res['clip']}, batch {res['batch']}, {res['base_params'] / 1e6:.2f} M params " \
                   f"({res['lora_params'] / 1e6:.3f} M LoRA)"
            out += [desc, ""]
            if gpu:
                out += [f"bf16 weights with float32 LoRA under autocast; gradient checkpointing on {ck} of "
                        f"{res['config']['num_layers']} blocks; SDPA backend `{res.get('attention')}`; one forward = "
                        f"{res['forward_tflop']:.1f} TFLOP counted ({res.get('forward_tflop_analytic', 0):.1f} analytic).", ""]
            out += _mode_table(res, gpu) + [""] + _ratio_table(res) + [""]
            variants = list(res.get("variants", []))
            followups = []
            for k, follow in enumerate(rep.get("followup_runs", []), start=2):
                for r2 in follow["results"]:
                    if r2["model"] == res["model"]:
                        base = {"variant": f"run {k}: baseline repeated", "modes": r2["modes"]}
                        variants += [base] + [{**v, "variant": f"run {k}: {v['variant']}"} for v in r2.get("variants", [])]
                        followups.append(f"Run {k} (same machine session): `{follow['command']}`")
            if variants:
                out += ["IPA step under other settings, same model and batch (`ckpt=N`: N of the blocks gradient-"
                        "checkpointed; `compile=1`: each block `torch.compile`d inside its checkpoint):", "",
                        "| setting | mode | step (s) | TFLOP/s | MFU | peak memory (MiB) |", "| --- | --- | --- | --- | --- | --- |"]
                for v in variants:
                    for mode, r in v["modes"].items():
                        if "error" in r:
                            out.append(f"| {v['variant']} | {mode} | {r['error'][:60]} | | | |")
                        elif "step_s" in r:
                            out.append(f"| {v['variant']} | {mode} | {r['step_s']:.3f} | {_fmt(r.get('achieved_tflops'), 1)} | "
                                       f"{100 * r['mfu']:.1f} % | {_fmt(r.get('peak_mem_mb'), 0)} |")
                out.append("")
                out += [f + "  " for f in followups] + ([""] if followups else [])
        if rep.get("notes"):
            out += ["Notes:", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--models", nargs="+", default=None, help="default: toy wan-animate-tiny (cpu), wan-1.3b (cuda)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 20 cpu, 5 cuda)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], help="wan-1.3b latent f h w")
    ap.add_argument("--checkpoint-layers", type=int, default=-1,
                    help="wan-1.3b: train.checkpoint_blocks, activation-checkpoint the first N blocks (-1 all, 0 none)")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile each transformer block")
    ap.add_argument("--attention", default="default", help="cuda SDPA backend: default | cudnn | flash | efficient | auto (time default and cudnn, keep the faster)")
    ap.add_argument("--layers", type=int, default=None, help="wan-1.3b: override the layer count (quick checks)")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="wan-1.3b extra runs after the main one, e.g. 'attention=cudnn;ckpt=15;modes=ipa+sft'")
    ap.add_argument("--variant-steps", type=int, default=3)
    ap.add_argument("--variant-budget-s", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the CI machine has 2 shared cores)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="print docs/benchmarks.md from result files instead of running")
    args = ap.parse_args(argv)
    if args.render:
        print(render_markdown([json.loads(Path(p).read_text()) for p in args.render]), end="")
        return 0
    if args.child:
        child_main(json.loads(args.child))
        return 0
    device = torch.device(args.device)
    args.steps = args.steps or (5 if device.type == "cuda" else 20)
    models = args.models or (["wan-1.3b"] if device.type == "cuda" else ["toy", "wan-animate-tiny"])
    torch.manual_seed(0)
    start = time.time()
    report = {
        "benchmark": "train_step",
        "command": "python benchmarks/train_step.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(device),
        "settings": {"steps": args.steps, "warmup": args.warmup, "threads": args.threads if device.type == "cpu" else None,
                     "attention": args.attention, "peak_tflops_bf16": args.peak_tflops if device.type == "cuda" else None,
                     "compile": args.compile,
                     "step": "as ipa_lib.stages.train.train: accelerator autocast + compute_loss + backward + "
                             "clip_grad_norm_ + AdamW on LoRA weights; speed settings by ipa_lib.models.speed"},
        "results": [],
    }
    for model in models:
        print(f"{model} on {device}", flush=True)
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        report["results"].append(bench(model, device, args))
    report["seconds"] = round(time.time() - start, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    for r in report["results"]:
        print(r["model"], json.dumps(r["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
