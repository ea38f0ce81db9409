"""ipa_lib.core.objective against hand-written float64 loops, plus the properties the losses must keep."""

import math

import pytest
import torch

from ipa_lib.core.objective import (
    dpo_loss,
    dpo_terms,
    ipa_loss,
    ipa_terms,
    kto_loss,
    kto_terms,
    sft_loss,
    weighted_error,
)

B, C, FR, H, W = 3, 2, 3, 2, 2
LOG2 = math.log(2)


def batch(seed=0, pol_noise=0.3, ref_noise=0.3):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    target = rn(B, C, FR, H, W)
    return dict(
        policy=target + pol_noise * rn(B, C, FR, H, W),
        reference=target + ref_noise * rn(B, C, FR, H, W),
        target=target,
        mask=torch.rand(B, FR, H, W, generator=g, dtype=torch.float64),  # soft values on purpose
        t=torch.rand(B, generator=g, dtype=torch.float64),
    )


# ----------------------------------------------------------------------------- reference loops


def loop_err(pred, target, mask, hw):
    """One sample: pred/target (C, F, H, W), mask (F, H, W) or None; plain Python floats."""
    p, q = pred.tolist(), target.tolist()
    m = None if mask is None else mask.tolist()
    total, n = 0.0, 0
    for c in range(len(p)):
        for f in range(len(p[c])):
            for h in range(len(p[c][f])):
                for x in range(len(p[c][f][h])):
                    w = 1.0 if m is None else 1.0 + (hw - 1.0) * m[f][h][x]
                    total += w * (p[c][f][h][x] - q[c][f][h][x]) ** 2
                    n += 1
    return total / n


def loop_logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def loop_sigmoid(x):
    return math.exp(loop_logsigmoid(x))


def errs(pred, target, mask, hw):
    return [loop_err(pred[b], target[b], None if mask is None else mask[b], hw) for b in range(pred.shape[0])]


def loop_ipa(d, beta, hw, mask):
    pol, ref = errs(d["policy"], d["target"], mask, hw), errs(d["reference"], d["target"], mask, hw)
    t = d["t"].tolist()
    return sum(-loop_logsigmoid(0.5 * beta * (1 - t[b]) ** 2 * (ref[b] - pol[b])) for b in range(len(t))) / len(t)


# ----------------------------------------------------------------------------- agreement with the loops


@pytest.mark.parametrize("use_mask", [True, False])
@pytest.mark.parametrize("hw", [1.0, 10.0, 3.5])
def test_weighted_error_matches_loop(use_mask, hw):
    d = batch()
    mask = d["mask"] if use_mask else None
    got = weighted_error(d["policy"], d["target"], mask, hand_weight=hw)
    assert got.shape == (B,)
    torch.testing.assert_close(got, torch.tensor(errs(d["policy"], d["target"], mask, hw), dtype=torch.float64))
    if use_mask:  # (B, 1, F, H, W) is the same mask
        torch.testing.assert_close(weighted_error(d["policy"], d["target"], mask.unsqueeze(1), hand_weight=hw), got)


@pytest.mark.parametrize("beta,hw", [(600.0, 10.0), (20.0, 10.0), (20.0, 1.0)])
def test_ipa_matches_loop(beta, hw):
    d = batch(1)
    got = ipa_loss(d["policy"], d["reference"], d["target"], d["t"], d["mask"], beta=beta, hand_weight=hw)
    assert got.ndim == 0
    assert got.item() == pytest.approx(loop_ipa(d, beta, hw, d["mask"]), rel=1e-12)


def test_sft_matches_loop():
    d = batch(2)
    got = sft_loss(d["policy"], d["target"], d["mask"], hand_weight=10.0)
    assert got.item() == pytest.approx(sum(errs(d["policy"], d["target"], d["mask"], 10.0)) / B, rel=1e-12)


def test_dpo_matches_loop():
    w, l = batch(3), batch(4)
    beta, hw = 30.0, 10.0
    got = dpo_loss(w["policy"], w["reference"], w["target"], l["policy"], l["reference"], l["target"], w["t"],
                   w["mask"], l["mask"], beta=beta, hand_weight=hw)
    pw, rw = errs(w["policy"], w["target"], w["mask"], hw), errs(w["reference"], w["target"], w["mask"], hw)
    pl, rl = errs(l["policy"], l["target"], l["mask"], hw), errs(l["reference"], l["target"], l["mask"], hw)
    want = sum(-loop_logsigmoid(-0.5 * beta * ((pw[b] - rw[b]) - (pl[b] - rl[b]))) for b in range(B)) / B
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("labels", [[True, False, True], [True] * 3, [False] * 3])
@pytest.mark.parametrize("pol_noise", [0.1, 0.5])  # mean reward > 0 (z active) and < 0 (z clamped)
def test_kto_matches_loop(labels, pol_noise):
    d = batch(5, pol_noise=pol_noise, ref_noise=0.3)
    beta, hw = 5.0, 10.0
    desirable = torch.tensor(labels)
    got = kto_loss(d["policy"], d["reference"], d["target"], d["t"], desirable, d["mask"], beta=beta, hand_weight=hw)
    pol, ref = errs(d["policy"], d["target"], d["mask"], hw), errs(d["reference"], d["target"], d["mask"], hw)
    r = [beta * (ref[b] - pol[b]) for b in range(B)]
    z = max(sum(r) / B, 0.0)
    assert (z > 0) == (pol_noise < 0.3)
    u = [loop_sigmoid(r[b] - z) if labels[b] else loop_sigmoid(z - r[b]) for b in range(B)]
    assert got.item() == pytest.approx(sum(1 - x for x in u) / B, rel=1e-12)
    assert torch.isfinite(got)


# ----------------------------------------------------------------------------- properties


def _all_losses(d, l):
    """name -> loss with policy and reference as given (grad-tracking tensors)."""
    return {
        "ipa": lambda: ipa_loss(d["policy"], d["reference"], d["target"], d["t"], d["mask"], beta=20.0),
        "dpo": lambda: dpo_loss(d["policy"], d["reference"], d["target"], l["policy"], l["reference"], l["target"],
                                d["t"], d["mask"], l["mask"], beta=20.0),
        "kto": lambda: kto_loss(d["policy"], d["reference"], d["target"], d["t"], torch.tensor([True, False, True]),
                                d["mask"], beta=5.0),
    }


@pytest.mark.parametrize("name", ["ipa", "dpo", "kto"])
def test_gradient_reaches_only_policy(name):
    d, l = batch(6), batch(7)
    for x in (d, l):
        x["policy"].requires_grad_(True)
        x["reference"].requires_grad_(True)
    _all_losses(d, l)[name]().backward()
    assert d["policy"].grad is not None and d["policy"].grad.abs().sum() > 0
    assert d["reference"].grad is None and l["reference"].grad is None
    if name == "dpo":
        assert l["policy"].grad.abs().sum() > 0


def test_identical_policy_and_reference_is_log2():
    d = batch(8)
    terms = ipa_terms(d["policy"], d["policy"].clone(), d["target"], d["t"], d["mask"])
    assert terms.loss.item() == LOG2  # gain is exactly 0, logsigmoid(0) = -log 2 in float64
    assert terms.implicit_accuracy.item() == 0.0


def test_t_one_gives_log2_whatever_the_preds():
    d = batch(9, pol_noise=0.01, ref_noise=5.0)
    t = torch.ones(B, dtype=torch.float64)
    assert ipa_loss(d["policy"], d["reference"], d["target"], t, d["mask"]).item() == LOG2


def test_mask_weight_only_inside_mask_on_every_frame():
    target = torch.zeros(1, C, FR, H, W, dtype=torch.float64)
    mask = torch.zeros(1, FR, H, W, dtype=torch.float64)
    mask[0, :, 0, 0] = 1.0  # hand at pixel (0, 0) on every frame, including frame 0
    n, hw, delta = C * FR * H * W, 10.0, 0.5

    def err_with_bump(f, h, x):
        pred = target.clone()
        pred[0, 1, f, h, x] = delta
        return weighted_error(pred, target, mask, hand_weight=hw).item()

    assert err_with_bump(1, 1, 1) == pytest.approx(delta**2 / n)  # outside the mask: factor 1
    assert err_with_bump(2, 0, 0) == pytest.approx(hw * delta**2 / n)  # inside: factor hand_weight
    assert err_with_bump(0, 0, 0) == pytest.approx(hw * delta**2 / n)  # frame 0 is a generated frame too


def test_hand_weight_one_equals_no_mask():
    d = batch(10)
    a = ipa_loss(d["policy"], d["reference"], d["target"], d["t"], d["mask"], hand_weight=1.0)
    b = ipa_loss(d["policy"], d["reference"], d["target"], d["t"], None)
    assert a.item() == b.item()
    assert torch.equal(weighted_error(d["policy"], d["target"], d["mask"], hand_weight=1.0),
                       weighted_error(d["policy"], d["target"]))


def test_sign():
    d = batch(11, pol_noise=0.1, ref_noise=0.3)  # policy closer to the target
    better = ipa_terms(d["policy"], d["reference"], d["target"], d["t"], d["mask"])
    assert better.loss.item() < LOG2 and better.implicit_accuracy.item() == 1.0
    worse = ipa_loss(d["reference"], d["policy"], d["target"], d["t"], d["mask"])
    assert worse.item() > LOG2


def test_reduction_is_mean_of_logsigmoid():
    # gains +g and -g: logits average to 0, so logsigmoid(mean) would give exactly log 2
    target = torch.zeros(2, C, FR, H, W, dtype=torch.float64)
    policy, reference = target.clone(), target.clone()
    policy[1] += 1.0
    reference[0] += 1.0
    t = torch.zeros(2, dtype=torch.float64)
    terms = ipa_terms(policy, reference, target, t, beta=8.0, hand_weight=1.0)
    assert terms.logits.tolist() == [4.0, -4.0]
    want = (-loop_logsigmoid(4.0) - loop_logsigmoid(-4.0)) / 2
    assert terms.loss.item() == pytest.approx(want, rel=1e-12)
    assert terms.loss.item() > LOG2 + 1.0


def test_gradcheck_all_losses():
    d, l = batch(12, pol_noise=0.5, ref_noise=0.1), batch(13)
    kw = dict(dtype=torch.float64)
    pw = d["policy"].clone().requires_grad_(True)
    pl = l["policy"].clone().requires_grad_(True)
    checks = {
        "ipa": (lambda p: ipa_loss(p, d["reference"], d["target"], d["t"], d["mask"], beta=20.0), (pw,)),
        "sft": (lambda p: sft_loss(p, d["target"], d["mask"]), (pw,)),
        "dpo": (lambda a, b: dpo_loss(a, d["reference"], d["target"], b, l["reference"], l["target"], d["t"],
                                      d["mask"], l["mask"], beta=20.0), (pw, pl)),
        # policy worse than reference everywhere: mean reward < 0, so the detached z sits at its
        # clamp (0) and finite differences see the same function autograd differentiates
        "kto": (lambda p: kto_loss(p, d["reference"], d["target"], d["t"], torch.tensor([True, False, True]),
                                   d["mask"], beta=2.0), (pw,)),
    }
    assert kto_terms(pw, d["reference"], d["target"], d["t"], torch.tensor([True] * 3), beta=2.0).kl.item() == 0.0
    for name, (fn, inputs) in checks.items():
        assert all(x.dtype == kw["dtype"] for x in inputs)
        assert torch.autograd.gradcheck(fn, inputs), name


def test_terms_metrics():
    d, l = batch(14), batch(15)
    m = ipa_terms(d["policy"], d["reference"], d["target"], d["t"], d["mask"]).metrics()
    assert set(m) == {"policy_err", "reference_err", "gain", "scale", "logits", "loss", "implicit_acc",
                      "saturated", "logits_p10", "logits_p50", "logits_p90", "rel_gain"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    dt = dpo_terms(d["policy"], d["reference"], d["target"], l["policy"], l["reference"], l["target"], d["t"])
    assert dt.implicit_accuracy.item() == pytest.approx(2 / 3)  # margins +, -, + on this seed
    assert dt.margin.tolist()[1] < 0 < min(dt.margin.tolist()[0], dt.margin.tolist()[2])
    assert "implicit_acc" in dt.metrics()
    assert "kl" in kto_terms(d["policy"], d["reference"], d["target"], d["t"], torch.tensor([True] * 3)).metrics()


def test_low_precision_inputs_are_upcast():
    d = batch(16)
    e = weighted_error(d["policy"].bfloat16(), d["target"].bfloat16(), d["mask"].bfloat16())
    assert e.dtype == torch.float32


# ----------------------------------------------------------------------------- input errors


def _bad(**over):
    d = batch(17)
    d.update(over)
    return lambda: ipa_loss(d["policy"], d["reference"], d["target"], d["t"], d["mask"],
                            beta=d.get("beta", 600.0), hand_weight=d.get("hw", 10.0))


@pytest.mark.parametrize("call,match", [
    (_bad(policy=torch.zeros(B, C, FR, H, W + 1, dtype=torch.float64)),
     r"policy_pred shape \(3, 2, 3, 2, 3\) != target shape \(3, 2, 3, 2, 2\)"),
    (_bad(reference=torch.zeros(B, C, FR, H + 1, W, dtype=torch.float64)), r"reference_pred shape \(3, 2, 3, 3, 2\)"),
    (_bad(policy=torch.zeros(B, C, H, W), target=torch.zeros(B, C, H, W)), r"policy_pred must be \(B, C, F, H, W\)"),
    (_bad(t=torch.rand(2)), r"t must have shape \(B,\) = \(3,\), got shape \(2,\)"),
    (_bad(t=torch.rand(B, 1)), r"t must have shape \(B,\) = \(3,\), got shape \(3, 1\)"),
    (_bad(t=torch.tensor([0.0, 500.0, 999.0])), r"t must lie in \[0, 1\]"),
    (_bad(mask=torch.zeros(B, FR + 1, H, W)), r"hand_mask must be \(B, F, H, W\) = \(3, 3, 2, 2\).*got shape \(3, 4, 2, 2\)"),
    (_bad(mask=torch.full((B, FR, H, W), 255.0)), r"hand_mask values must lie in \[0, 1\]"),
    (_bad(beta=0.0), r"beta must be > 0, got 0.0"),
    (_bad(hw=0.5), r"hand_weight must be >= 1"),
    (lambda: weighted_error(torch.zeros(1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 3)), r"pred shape .* != target shape"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_pair_and_label_inputs_raise():
    d, l, short = batch(18), batch(19), batch(20)
    with pytest.raises(ValueError, match=r"hand_mask_l must be \(B, F, H, W\)"):
        dpo_loss(d["policy"], d["reference"], d["target"], l["policy"], l["reference"], l["target"], d["t"],
                 d["mask"], l["mask"][:, :1])
    with pytest.raises(ValueError, match=r"target_w batch 3 != target_l batch 2"):
        dpo_loss(d["policy"], d["reference"], d["target"], short["policy"][:2], short["reference"][:2],
                 short["target"][:2], d["t"])
    with pytest.raises(ValueError, match=r"desirable must be a bool tensor of shape \(3,\)"):
        kto_loss(d["policy"], d["reference"], d["target"], d["t"], torch.ones(B))
    with pytest.raises(ValueError, match=r"desirable must be a bool tensor of shape \(3,\)"):
        kto_loss(d["policy"], d["reference"], d["target"], d["t"], torch.ones(2, dtype=torch.bool))
