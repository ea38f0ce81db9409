"""Training objectives for flow-matching video models: IPA and the baselines beside it.

Pure tensor functions, no model calls: the trainer runs policy and reference on the
same x_t = (1 - t) * x0 + t * e and passes their velocity predictions here, with the
target v = e - x0. All losses share `weighted_error`, so the hand weighting means the same
thing everywhere.

Every latent frame the losses see is a generated one, so all are hand-weighted alike. In
Wan-Animate (diffusers 0.42 `WanAnimatePipeline`) the reference image sits in an extra latent
slot before the video frames; the backend strips that slot before the loss
(`ipa_lib.models.wan_animate`: the velocity is for the f video frames only), and in the
first segment no video frame is given (`prepare_prev_segment_cond_latents` without previous
frames: zero conditioning, mask 0), so all f are generated. The toy world's frame 0 is an
ordinary generated frame too. (An earlier version exempted latent frame 0 from the hand
weight, after a rule that it encodes the reference: here it never does.)

References
- IPA: "Implicit Preference Alignment for Human Image Animation" (ICML 2026); the loss
  as written in /work/shared/IPA.md.
- Diffusion-DPO: Wallace et al., "Diffusion Model Alignment Using Direct Preference
  Optimization" (2023, arXiv:2311.12908); its flow-matching form is Flow-DPO
  (Liu et al., "Improving Video Generation with Human Feedback", 2025, arXiv:2501.13918).
- Diffusion-KTO: Li et al., "Aligning Diffusion Models by Optimizing Human Utility"
  (2024, arXiv:2404.04465), after KTO (Ethayarajh et al. 2024, arXiv:2402.01306).

Shapes: preds and targets (B, C, F, H, W) latents; t (B,) in [0, 1] (timestep divided by
num_train_timesteps); hand masks (B, F, H, W) or (B, 1, F, H, W) in [0, 1] on the latent grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "weighted_error", "sft_loss", "SATURATED",
    "IPATerms", "ipa_terms", "ipa_loss", "sft_t2_terms",
    "DPOTerms", "dpo_terms", "dpo_loss",
    "KTOTerms", "kto_terms", "kto_loss",
]

# -----------------------------------------------------------------------------
# input checks: run once at the public boundary, so the maths below stays plain


def _check_pred(name: str, pred: Tensor, target_name: str, target: Tensor) -> None:
    if pred.ndim != 5:
        raise ValueError(f"{name} must be (B, C, F, H, W), got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{name} shape {tuple(pred.shape)} != {target_name} shape {tuple(target.shape)}")


def _check_mask(name: str, mask: Tensor | None, shape: torch.Size) -> Tensor | None:
    """Return the mask as (B, F, H, W), or None."""
    if mask is None:
        return None
    B, _, Fr, H, W = shape
    if mask.ndim == 5 and mask.shape[1] == 1:
        mask = mask.squeeze(1)
    if tuple(mask.shape) != (B, Fr, H, W):
        raise ValueError(
            f"{name} must be (B, F, H, W) = {(B, Fr, H, W)} or (B, 1, F, H, W) to match the "
            f"predictions, got shape {tuple(mask.shape)}"
        )
    # a uint8 0/255 mask would silently make the hand weight 255x too large
    if ((mask < 0) | (mask > 1)).any():
        raise ValueError(f"{name} values must lie in [0, 1], got min {mask.min().item()}, max {mask.max().item()}")
    return mask


def _check_t(t: Tensor, batch: int) -> Tensor:
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"t must have shape (B,) = ({batch},), got shape {tuple(t.shape)}")
    # raw scheduler timesteps (0..1000) are the usual mistake: t must be the fraction
    if ((t < 0) | (t > 1)).any():
        raise ValueError(f"t must lie in [0, 1] (timestep / num_train_timesteps), got min {t.min().item()}, max {t.max().item()}")
    return t


def _check_hparams(hand_weight: float, beta: float | None = None) -> None:
    if beta is not None and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not hand_weight >= 1:
        raise ValueError(f"hand_weight must be >= 1 (1 = no hand emphasis), got {hand_weight}")


# -----------------------------------------------------------------------------
# the shared per-sample error


def _weighted_error(pred: Tensor, target: Tensor, mask: Tensor | None, hand_weight: float) -> Tensor:
    # at least float32: gain is a small difference of two large means, bf16 would erase it
    dtype = torch.promote_types(pred.dtype, torch.float32)
    se = (pred.to(dtype) - target.to(dtype)).pow(2)  # (B, C, F, H, W)
    if mask is None or hand_weight == 1:
        return se.mean(dim=(1, 2, 3, 4))
    w = 1 + (hand_weight - 1) * mask.to(dtype)  # (B, F, H, W): every frame is a generated one
    return (se * w.unsqueeze(1)).mean(dim=(1, 2, 3, 4))  # (B,)


def weighted_error(pred: Tensor, target: Tensor, hand_mask: Tensor | None = None, *, hand_weight: float = 10.0) -> Tensor:
    """Per-sample hand-weighted squared error (IPA, ICML 2026).

        w      = 1 + (hand_weight - 1) * M        (every latent frame alike)
        err_b  = mean over C, F, H, W of  w * (pred - target)^2

    M is `hand_mask` broadcast over channels. Not normalised by mean(w), as in the paper:
    a sample with more hand area weighs more. hand_mask=None or hand_weight=1 is plain MSE.

    Args:
        pred, target: (B, C, F, H, W).
        hand_mask: (B, F, H, W) or (B, 1, F, H, W), values in [0, 1], or None.
        hand_weight: lambda_hand >= 1.
    Returns:
        (B,) errors, float32 or wider.
    """
    _check_hparams(hand_weight)
    _check_pred("pred", pred, "target", target)
    mask = _check_mask("hand_mask", hand_mask, pred.shape)
    return _weighted_error(pred, target, mask, hand_weight)


def sft_loss(policy_pred: Tensor, target: Tensor, hand_mask: Tensor | None = None, *, hand_weight: float = 10.0) -> Tensor:
    """Supervised fine-tuning on the gated samples: loss = mean_b err_b(policy) (IPA baseline)."""
    return weighted_error(policy_pred, target, hand_mask, hand_weight=hand_weight).mean()


# -----------------------------------------------------------------------------
# diagnostics: every loss returns its intermediate terms, the *_loss functions take .loss


@dataclass
class _Terms:
    def metrics(self) -> dict[str, float]:
        """Batch means as floats plus `implicit_acc`, for `train/<key>` logging."""
        out = {f.name: getattr(self, f.name).detach().float().mean().item() for f in fields(self)}
        out["implicit_acc"] = self.implicit_accuracy.item()
        return out


SATURATED = 0.1  # a sample is saturated when sigmoid(-logit) < 0.1: its gradient weight has all but gone


def logit_diagnostics(logits: Tensor, gain: Tensor, reference_err: Tensor) -> dict[str, float]:
    """How far a reference-anchored loss is from its linear regime, per batch:

        saturated   = mean_b [sigmoid(-logits_b) < SATURATED]   (the fraction whose weight has gone)
        logits_p10, logits_p50, logits_p90                       (the logit distribution)
        rel_gain    = mean_b gain_b / err_b(reference)           (the gain relative to the reference error)

    At saturated = 0 the loss acts as a reweighted SFT (its gradient is SFT's times
    0.5 * scale * sigmoid(-logits)); clipping and Adam then cancel beta."""
    lg = logits.detach().float()
    q = torch.quantile(lg, torch.tensor([0.1, 0.5, 0.9], device=lg.device)) if lg.numel() else torch.zeros(3)
    rel = gain.detach().float() / reference_err.detach().float().clamp(min=1e-12)
    return {"saturated": (torch.sigmoid(-lg) < SATURATED).float().mean().item(), "logits_p10": q[0].item(),
            "logits_p50": q[1].item(), "logits_p90": q[2].item(), "rel_gain": rel.mean().item()}


@dataclass
class IPATerms(_Terms):
    policy_err: Tensor  # (B,)
    reference_err: Tensor  # (B,) no grad
    gain: Tensor  # (B,) reference_err - policy_err; > 0: the policy fits the kept sample better
    scale: Tensor  # (B,) 0.5 * beta * (1 - t)^2, the effective beta at each sample's t
    logits: Tensor  # (B,) scale * gain: the implicit reward of each sample
    loss: Tensor  # ()

    @property
    def implicit_accuracy(self) -> Tensor:
        """Fraction of samples with gain > 0."""
        return (self.gain > 0).float().mean()

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), **logit_diagnostics(self.logits, self.gain, self.reference_err)}


def _anchored_errors(policy_pred: Tensor, reference_pred: Tensor, target: Tensor, t: Tensor, hand_mask: Tensor | None,
                     beta: float, hand_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Validate the inputs of a reference-anchored loss (IPA, KTO); return (t, err(policy), err(reference))."""
    _check_hparams(hand_weight, beta)
    _check_pred("policy_pred", policy_pred, "target", target)
    _check_pred("reference_pred", reference_pred, "target", target)
    t = _check_t(t, target.shape[0])
    mask = _check_mask("hand_mask", hand_mask, target.shape)
    policy_err = _weighted_error(policy_pred, target, mask, hand_weight)
    with torch.no_grad():  # a constant baseline: no graph, no gradient to anything
        reference_err = _weighted_error(reference_pred, target, mask, hand_weight)
    return t, policy_err, reference_err


def _ipa_logits(t: Tensor, policy_err: Tensor, reference_err: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(gain, scale, logits): gain = err(reference) - err(policy), scale = 0.5 beta (1 - t)^2, logits = scale * gain."""
    gain = reference_err - policy_err
    scale = 0.5 * beta * (1 - t.to(gain.dtype)) ** 2
    return gain, scale, scale * gain


def ipa_terms(
    policy_pred: Tensor,
    reference_pred: Tensor,
    target: Tensor,
    t: Tensor,
    hand_mask: Tensor | None = None,
    *,
    beta: float = 600.0,
    hand_weight: float = 10.0,
) -> IPATerms:
    """Implicit Preference Alignment loss and its terms (IPA, ICML 2026).

        gain_b   = err_b(reference) - err_b(policy)          reference: no grad
        logits_b = 0.5 * beta * (1 - t_b)^2 * gain_b
        loss     = mean_b  -log sigmoid(logits_b)

    The frozen reference is the implicit KL anchor: the loss rewards fitting the gated
    sample *better than the starting model*, not fitting it at all costs (that is SFT).
    At gain = 0 the loss is log 2; (1 - t)^2 fades out the nearly-pure-noise timesteps.
    Policy and reference must see the same x_t and t (the caller's duty).

    Args:
        policy_pred, reference_pred, target: (B, C, F, H, W) velocities.
        t: (B,) in [0, 1].
        hand_mask: (B, F, H, W) or (B, 1, F, H, W) in [0, 1], or None.
        beta: > 0, paper default 600 (200 gave extra hands, 2000 blurry ones).
        hand_weight: lambda_hand >= 1, paper default 10; 1 is the global variant.
    """
    t, policy_err, reference_err = _anchored_errors(policy_pred, reference_pred, target, t, hand_mask, beta, hand_weight)
    gain, scale, logits = _ipa_logits(t, policy_err, reference_err, beta)
    loss = -F.logsigmoid(logits).mean()  # mean of logsigmoid, never logsigmoid of the mean
    return IPATerms(policy_err, reference_err, gain, scale, logits, loss)


def ipa_loss(
    policy_pred: Tensor,
    reference_pred: Tensor,
    target: Tensor,
    t: Tensor,
    hand_mask: Tensor | None = None,
    *,
    beta: float = 600.0,
    hand_weight: float = 10.0,
) -> Tensor:
    """Scalar IPA loss, mean_b -log sigmoid(0.5 * beta * (1 - t_b)^2 * gain_b); see `ipa_terms`."""
    return ipa_terms(policy_pred, reference_pred, target, t, hand_mask, beta=beta, hand_weight=hand_weight).loss


def sft_t2_terms(
    policy_pred: Tensor,
    reference_pred: Tensor,
    target: Tensor,
    t: Tensor,
    hand_mask: Tensor | None = None,
    *,
    beta: float = 600.0,
    hand_weight: float = 10.0,
) -> IPATerms:
    """The control: IPA's linear-regime limit, i.e. SFT weighted by (1 - t)^2 (same signature and terms).

        logits_b = 0.5 * beta * (1 - t_b)^2 * gain_b            as in IPA
        loss     = log 2 - 0.5 * mean_b logits_b
                 = log 2 + mean_b 0.25 * beta * (1 - t_b)^2 * (err_b(policy) - err_b(reference))

    The first-order Taylor expansion of IPA's -log sigmoid(logits) at logits = 0, so it equals
    IPA's loss and gradient while no sample is saturated and keeps SFT's behaviour after that:
    the gradient is that of a (1 - t)^2-weighted SFT (the reference only shifts the value).
    If IPA differs from SFT only through its (1 - t)^2 weighting, this control matches it.
    """
    t, policy_err, reference_err = _anchored_errors(policy_pred, reference_pred, target, t, hand_mask, beta, hand_weight)
    gain, scale, logits = _ipa_logits(t, policy_err, reference_err, beta)
    loss = math.log(2.0) - 0.5 * logits.mean()
    return IPATerms(policy_err, reference_err, gain, scale, logits, loss)


# -----------------------------------------------------------------------------
# Diffusion-DPO / Flow-DPO (pairs)


@dataclass
class DPOTerms(_Terms):
    policy_err_w: Tensor  # (B,)
    reference_err_w: Tensor  # (B,) no grad
    policy_err_l: Tensor  # (B,)
    reference_err_l: Tensor  # (B,) no grad
    margin: Tensor  # (B,) (ref_w - pol_w) - (ref_l - pol_l); > 0: the winner gained more
    logits: Tensor  # (B,) 0.5 * beta * margin
    loss: Tensor  # ()

    @property
    def implicit_accuracy(self) -> Tensor:
        """Fraction of pairs whose winner improved more than the loser (margin > 0)."""
        return (self.margin > 0).float().mean()


def dpo_terms(
    policy_pred_w: Tensor,
    reference_pred_w: Tensor,
    target_w: Tensor,
    policy_pred_l: Tensor,
    reference_pred_l: Tensor,
    target_l: Tensor,
    t: Tensor,
    hand_mask_w: Tensor | None = None,
    hand_mask_l: Tensor | None = None,
    *,
    beta: float = 2000.0,
    hand_weight: float = 10.0,
) -> DPOTerms:
    """Diffusion-DPO (Wallace et al. 2023) in its flow-matching form (Flow-DPO), with hand weights.

        loss = mean_b -log sigmoid(-0.5 * beta * ((err_w(pol) - err_w(ref)) - (err_l(pol) - err_l(ref))))

    No (1 - t)^2 factor, as in IPA.md: the usual constant-weight Diffusion-DPO form. So
    DPO's beta is not on IPA's scale (IPA's effective beta is 0.5 * beta * (1 - t)^2);
    `t` is taken for a uniform signature and validated only. The winner and loser must
    share the noise e and t (the caller's duty): otherwise the margin measures the noise
    draw, not the preference. Typical beta: 2500-5000 for SD, 100-2000 for flow models.

    Args:
        *_w, *_l: (B, C, F, H, W) predictions and targets of the preferred / rejected clip.
        t: (B,) in [0, 1], shared by both clips.
        hand_mask_w, hand_mask_l: each clip's own mask, or None.
    """
    _check_hparams(hand_weight, beta)
    _check_pred("policy_pred_w", policy_pred_w, "target_w", target_w)
    _check_pred("reference_pred_w", reference_pred_w, "target_w", target_w)
    _check_pred("policy_pred_l", policy_pred_l, "target_l", target_l)
    _check_pred("reference_pred_l", reference_pred_l, "target_l", target_l)
    if target_w.shape[0] != target_l.shape[0]:
        raise ValueError(f"target_w batch {target_w.shape[0]} != target_l batch {target_l.shape[0]}: pairs must align")
    _check_t(t, target_w.shape[0])
    mask_w = _check_mask("hand_mask_w", hand_mask_w, target_w.shape)
    mask_l = _check_mask("hand_mask_l", hand_mask_l, target_l.shape)

    pol_w = _weighted_error(policy_pred_w, target_w, mask_w, hand_weight)
    pol_l = _weighted_error(policy_pred_l, target_l, mask_l, hand_weight)
    with torch.no_grad():
        ref_w = _weighted_error(reference_pred_w, target_w, mask_w, hand_weight)
        ref_l = _weighted_error(reference_pred_l, target_l, mask_l, hand_weight)
    margin = (ref_w - pol_w) - (ref_l - pol_l)  # = -((pol_w - ref_w) - (pol_l - ref_l))
    logits = 0.5 * beta * margin
    loss = -F.logsigmoid(logits).mean()
    return DPOTerms(pol_w, ref_w, pol_l, ref_l, margin, logits, loss)


def dpo_loss(
    policy_pred_w: Tensor,
    reference_pred_w: Tensor,
    target_w: Tensor,
    policy_pred_l: Tensor,
    reference_pred_l: Tensor,
    target_l: Tensor,
    t: Tensor,
    hand_mask_w: Tensor | None = None,
    hand_mask_l: Tensor | None = None,
    *,
    beta: float = 2000.0,
    hand_weight: float = 10.0,
) -> Tensor:
    """Scalar Diffusion-DPO / Flow-DPO loss; see `dpo_terms`."""
    return dpo_terms(
        policy_pred_w, reference_pred_w, target_w, policy_pred_l, reference_pred_l, target_l, t,
        hand_mask_w, hand_mask_l, beta=beta, hand_weight=hand_weight,
    ).loss


# -----------------------------------------------------------------------------
# Diffusion-KTO (unpaired, binary labels)


@dataclass
class KTOTerms(_Terms):
    policy_err: Tensor  # (B,)
    reference_err: Tensor  # (B,) no grad
    rewards: Tensor  # (B,) beta * (reference_err - policy_err)
    kl: Tensor  # () the reference point z0, detached, >= 0
    logits: Tensor  # (B,) rewards - z for desirable samples, z - rewards for undesirable ones
    loss: Tensor  # ()

    @property
    def implicit_accuracy(self) -> Tensor:
        """Fraction of samples on their label's side of the baseline (logits > 0)."""
        return (self.logits > 0).float().mean()


def kto_terms(
    policy_pred: Tensor,
    reference_pred: Tensor,
    target: Tensor,
    t: Tensor,
    desirable: Tensor,
    hand_mask: Tensor | None = None,
    *,
    kl_policy_err: Tensor | None = None,
    kl_reference_err: Tensor | None = None,
    beta: float = 1000.0,
    hand_weight: float = 10.0,
) -> KTOTerms:
    """Diffusion-KTO (Li et al. 2024) with hand weights.

        r_b  = beta * (err_b(reference) - err_b(policy))
        z0   = max(mean_j beta * (err_j'(reference) - err_j'(policy)), 0)    detached
        U_b  = sigmoid(r_b - z0) if desirable_b else sigmoid(z0 - r_b)
        loss = mean_b (1 - U_b)

    z0 is KTO's reference point, an estimate of KL(policy || reference) from *mismatched*
    pairs j' (a clip denoised under another sample's conditioning), as in KTO (Ethayarajh et
    al. 2024, Sec. 4: z0 estimated from the batch's mismatched (x_i, y_{i+1}) pairs) and TRL's
    KTOTrainer (`kl = (policy_KL_logps - reference_KL_logps).mean().clamp(min=0)`, detached);
    in the diffusion form log pi(y|x) - log pi_ref(y|x) is beta * (err(reference) - err(policy)).
    The errors of those pairs come in `kl_policy_err`, `kl_reference_err` (B',) (the trainer
    builds them); without them z0 falls back to the batch's own rewards (the older estimate,
    which sits at its clamp of 0 when rewards are negative). Detached so it is a baseline, not
    a target. Labels are applied per sample. No (1 - t)^2 factor (Diffusion-KTO weights
    timesteps uniformly); `t` is validated only.

    Args:
        policy_pred, reference_pred, target: (B, C, F, H, W).
        t: (B,) in [0, 1].
        desirable: (B,) bool, True for samples the gate kept.
        kl_policy_err, kl_reference_err: (B',) errors of mismatched pairs, or None.
        beta: > 0, about 1000.
    """
    _, policy_err, reference_err = _anchored_errors(policy_pred, reference_pred, target, t, hand_mask, beta, hand_weight)
    B = target.shape[0]
    if desirable.dtype != torch.bool or tuple(desirable.shape) != (B,):
        raise ValueError(f"desirable must be a bool tensor of shape ({B},), got {desirable.dtype} {tuple(desirable.shape)}")
    rewards = beta * (reference_err - policy_err)
    if (kl_policy_err is None) != (kl_reference_err is None):
        raise ValueError("kl_policy_err and kl_reference_err come together (the mismatched pairs' errors)")
    if kl_policy_err is not None:
        kl = (beta * (kl_reference_err.detach() - kl_policy_err.detach())).mean().clamp(min=0)
    else:
        kl = rewards.detach().mean().clamp(min=0)
    logits = torch.where(desirable.to(rewards.device), rewards - kl, kl - rewards)
    loss = (1 - torch.sigmoid(logits)).mean()
    return KTOTerms(policy_err, reference_err, rewards, kl, logits, loss)


def kto_loss(
    policy_pred: Tensor,
    reference_pred: Tensor,
    target: Tensor,
    t: Tensor,
    desirable: Tensor,
    hand_mask: Tensor | None = None,
    *,
    kl_policy_err: Tensor | None = None,
    kl_reference_err: Tensor | None = None,
    beta: float = 1000.0,
    hand_weight: float = 10.0,
) -> Tensor:
    """Scalar Diffusion-KTO loss, mean_b (1 - U_b); see `kto_terms`."""
    return kto_terms(policy_pred, reference_pred, target, t, desirable, hand_mask, kl_policy_err=kl_policy_err,
                     kl_reference_err=kl_reference_err, beta=beta, hand_weight=hand_weight).loss
