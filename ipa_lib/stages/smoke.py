"""`ipa smoke --backend NAME`: a backend's whole contract, end to end, on tiny random weights.

Builds the backend from a tiny random model (no downloads), then checks and prints, one
line each: the protocol is implemented; a clip generates with the right shape and range;
bad inputs fail with errors that name the problem; a few IPA steps on a fixed batch lower
the loss while the reference stays frozen; the adapter saves in diffusers' LoRA format and,
reloaded into a fresh model (for wan-animate: a stock `WanAnimatePipeline` through
`load_lora_weights`), reproduces the trained model's output exactly and differs from the base.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from ipa_lib.core.errors import RuntimeFailure

BACKENDS = ("wan-animate", "toy")


class SmokeCheckFailed(RuntimeFailure):
    """A smoke check found the backend breaking its contract."""


def require(ok: object, message: str) -> None:
    """A smoke check: raise SmokeCheckFailed(message) unless `ok` (works under `python -O`, unlike assert)."""
    if not ok:
        raise SmokeCheckFailed(message)


class _Checks:
    def __init__(self, out: Callable[[str], None]):
        self.out = out
        self.failed: list[str] = []

    def __call__(self, name: str, fn: Callable[[], str | None]):
        start = time.perf_counter()
        try:
            detail = fn() or ""
        except Exception as err:  # report and go on: the summary lists every failure
            self.failed.append(name)
            self.out(f"FAIL  {name}: {type(err).__name__}: {err}")
            self.out("      " + traceback.format_exc().strip().splitlines()[-2].strip())
            return
        self.out(f"ok    {name}{': ' + detail if detail else ''}  ({time.perf_counter() - start:.1f}s)")


def _expect_error(fn: Callable[[], object], *words: str) -> str:
    """Run `fn`, require a ValueError/FileNotFoundError whose message contains every word."""
    try:
        fn()
    except (ValueError, FileNotFoundError) as err:
        msg = str(err)
        missing = [w for w in words if w.lower() not in msg.lower()]
        if missing:
            raise SmokeCheckFailed(f"error does not mention {missing}: {msg}") from None
        return msg.splitlines()[0][:110]
    raise SmokeCheckFailed("no error raised")


def _build(backend: str):
    if backend == "wan-animate":
        from ipa_lib.models.wan_animate import WanAnimateBackend
        from ipa_lib.models.wan_tiny import tiny_batch

        return WanAnimateBackend.tiny(), tiny_batch(batch_size=2)
    from ipa_lib.core.config import ModelConfig
    from ipa_lib.models.toy import ToyBackend, build_transformer
    from ipa_lib.models.wan_tiny import tiny_batch

    return ToyBackend(build_transformer(ModelConfig())), tiny_batch(batch_size=2, frames=5, size=32)


def _fresh_copy(backend: str, be):
    """A second, adapter-free instance of the same base model."""
    if backend == "wan-animate":
        from ipa_lib.models.wan_animate import WanAnimateBackend

        return WanAnimateBackend.tiny()
    from ipa_lib.core.config import ModelConfig
    from ipa_lib.models.toy import ToyBackend, build_transformer

    return ToyBackend(build_transformer(ModelConfig()))


def run_smoke(backend: str = "wan-animate", steps: int = 6, out: Callable[[str], None] = print) -> list[str]:
    """Run every check; return the names of the failed ones (empty = all passed)."""
    from ipa_lib.core.config import TrainConfig
    from ipa_lib.models.base import AnimationBackend
    from ipa_lib.stages.train import compute_loss

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (valid: {', '.join(BACKENDS)})")
    torch.manual_seed(0)
    check = _Checks(out)
    state: dict = {}
    out(f"ipa smoke --backend {backend}: tiny random model, CPU-sized")

    def build():
        state["be"], state["batch"] = _build(backend)
        n = sum(p.numel() for p in state["be"].transformer.parameters())
        return f"{type(state['be']).__name__} on {state['be'].device}, transformer {n:,} params"

    check("build tiny backend", build)
    if "be" not in state:
        return check.failed
    be, batch = state["be"], state["batch"]
    B, _, F, H, W = batch["video"].shape

    def protocol():
        require(isinstance(be, AnimationBackend), "does not implement AnimationBackend")
        x0 = be.encode(batch["video"])
        m = be.mask_to_latent(batch["hand_mask"])
        require(m.shape == (x0.shape[0], *x0.shape[2:]), f"mask {tuple(m.shape)} vs latents {tuple(x0.shape)}")
        return f"latents {tuple(x0.shape)}, latent hand mask {tuple(m.shape)}"

    check("protocol: encode / mask_to_latent shapes", protocol)

    def generate():
        clip = be.generate(batch, torch.Generator().manual_seed(0), 2)
        require(clip.shape == (B, 3, F, H, W), f"shape {tuple(clip.shape)} != {(B, 3, F, H, W)}")
        require(torch.isfinite(clip).all() and clip.min() >= -1 and clip.max() <= 1, "values outside [-1, 1]")
        again = be.generate(batch, torch.Generator().manual_seed(0), 2)
        require(torch.equal(clip, again), "same seed gave a different clip")
        return f"{tuple(clip.shape)} in [{clip.min():.2f}, {clip.max():.2f}], reproducible"

    check("generate a clip (2 steps)", generate)

    if backend == "wan-animate":
        from ipa_lib.models.wan_animate import WanAnimateBackend

        def bad_inputs():
            msgs = [
                _expect_error(lambda: WanAnimateBackend.from_pretrained("/nonexistent/wan-animate"), "/nonexistent/wan-animate"),
                _expect_error(lambda: be.encode(batch["video"][:, :, :16]), "4k+1", "16"),
                _expect_error(lambda: be.condition({**batch, "hand_mask": batch["hand_mask"][..., :16]}), "hand_mask"),
            ]
            return "".join("\n        " + m for m in msgs)

        check("bad inputs: model path, frame count, mask shape", bad_inputs)

    def bad_targets():
        return _expect_error(lambda: _fresh_copy(backend, be).add_lora(4, 4, ["to_q", "to_qq"]), "to_qq")

    check("bad LoRA target names", bad_targets)

    cfg = TrainConfig(loss="ipa", lora_rank=4, lora_alpha=4)

    def train():
        be.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        params = [p for p in be.transformer.parameters() if p.requires_grad]
        frozen = {n: p.detach().clone() for n, p in be.transformer.named_parameters() if not p.requires_grad}
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses, accs = [], []
        for _ in range(steps):
            loss, stats = compute_loss(be, batch, cfg, torch.Generator().manual_seed(0))  # fixed t, noise
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            accs.append(stats.get("implicit_acc", float("nan")))
        require(all(torch.equal(p, frozen[n]) for n, p in be.transformer.named_parameters() if n in frozen), "base weights moved")
        require(losses[-1] < losses[0], f"loss did not decrease: {losses}")
        state["trained"] = True
        return f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps, implicit acc {accs[-1]:.2f}, base frozen"

    check(f"{steps} IPA steps on a fixed batch: loss decreases", train)

    def reference_frozen():
        cond = be.condition(batch)
        x0 = be.encode(batch["video"])
        t = torch.full((B,), 0.5)
        with torch.no_grad():
            pol = be.predict_velocity(x0, t, cond)
            with be.reference_model():
                ref = be.predict_velocity(x0, t, cond)
            pol2 = be.predict_velocity(x0, t, cond)
        require(not torch.equal(pol, ref), "policy == reference after training")
        require(torch.equal(pol, pol2), "adapters not restored after reference_model()")
        return f"|policy - reference| max {(pol - ref).abs().max():.3g}, adapters restored"

    if state.get("trained"):
        check("reference = adapters disabled, differs from policy", reference_frozen)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter"

        def save():
            be.save_adapter(path)
            files = sorted(p.name for p in path.iterdir())
            return f"{path.name}/: {files}"

        if state.get("trained"):
            check("save adapter (diffusers LoRA format)", save)

        def reload():
            gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
            ours = be.generate(batch, gen(), 2)
            if backend == "wan-animate":
                from ipa_lib.models.wan_tiny import tiny_pipeline

                pipe = tiny_pipeline()  # a stock diffusers pipeline, same base weights
                kw = be.pipeline_kwargs(batch, 0, 2)
                base = pipe(**kw, prompt=be.prompt, generator=gen()).frames[0].permute(1, 0, 2, 3) * 2 - 1
                pipe.load_lora_weights(str(path))
                theirs = pipe(**kw, prompt=be.prompt, generator=gen()).frames[0].permute(1, 0, 2, 3) * 2 - 1
                ours = ours[0]
                how = "stock WanAnimatePipeline.load_lora_weights"
            else:
                fresh = _fresh_copy(backend, be)
                base = fresh.generate(batch, gen(), 2)
                fresh.load_adapter(path)
                theirs = fresh.generate(batch, gen(), 2)
                how = "fresh backend.load_adapter"
            diff = (ours - theirs).abs().max().item()
            require(diff <= 1e-5, f"reloaded output differs by {diff}")
            delta = (base - theirs).abs().max().item()
            require(delta > 0, "adapter changed nothing")
            return f"{how}: max |diff| {diff:.1e} vs trained, {delta:.3g} vs base"

        if (path / "pytorch_lora_weights.safetensors").exists():
            check("reload adapter into a fresh model: identical output", reload)
    return check.failed


def smoke_main(backend: str) -> int:
    """CLI entry: run the smoke checks, print one line per check, 0 when all pass."""
    start = time.perf_counter()
    failed = run_smoke(backend)
    took = time.perf_counter() - start
    if failed:
        print(f"smoke FAILED ({len(failed)}): {', '.join(failed)}  [{took:.0f}s]")
        return 1
    print(f"smoke passed  [{took:.0f}s]")
    return 0
