"""The control loss SFT-(1-t)^2, KTO's mismatched-pair reference point, the saturation
diagnostics, and every latent frame hand-weighted alike: against float64 loops."""

import math

import pytest
import torch

from ipa_lib.core.objective import SATURATED, ipa_terms, kto_terms, sft_t2_terms, weighted_error
from test_objective import B, C, FR, H, W, batch, loop_err, loop_sigmoid

LOG2 = math.log(2)


def test_every_latent_frame_is_hand_weighted_alike():
    target = torch.zeros(1, C, FR, H, W, dtype=torch.float64)
    mask = torch.zeros(1, FR, H, W, dtype=torch.float64)
    mask[0, :, 0, 0] = 1.0
    n, hw = C * FR * H * W, 10.0
    for f in range(FR):
        pred = target.clone()
        pred[0, 0, f, 0, 0] = 0.5
        assert weighted_error(pred, target, mask, hand_weight=hw).item() == pytest.approx(hw * 0.25 / n), f


def test_sft_t2_against_a_float64_loop_and_its_gradient_is_weighted_sft():
    d = batch(21)
    beta, hw = 600.0, 10.0
    pol = d["policy"].clone().requires_grad_(True)
    terms = sft_t2_terms(pol, d["reference"], d["target"], d["t"], d["mask"], beta=beta, hand_weight=hw)
    want = LOG2 + sum(0.25 * beta * (1 - d["t"][b].item()) ** 2
                      * (loop_err(d["policy"][b], d["target"][b], d["mask"][b], hw)
                         - loop_err(d["reference"][b], d["target"][b], d["mask"][b], hw)) for b in range(B)) / B
    assert terms.loss.item() == pytest.approx(want, rel=1e-12)
    terms.loss.backward()
    # the gradient is a (1 - t)^2-weighted SFT's: the reference only shifts the value
    pol2 = d["policy"].clone().requires_grad_(True)
    err = weighted_error(pol2, d["target"], d["mask"], hand_weight=hw)
    (0.25 * beta * ((1 - d["t"]) ** 2 * err).mean()).backward()
    assert torch.allclose(pol.grad, pol2.grad, rtol=1e-12, atol=0)


def test_sft_t2_is_ipa_in_the_linear_regime_and_not_beyond():
    d = batch(22, pol_noise=0.30, ref_noise=0.31)
    small, large = 1e-4, 1e4
    for beta, close in ((small, True), (large, False)):
        a = d["policy"].clone().requires_grad_(True)
        b = d["policy"].clone().requires_grad_(True)
        ipa = ipa_terms(a, d["reference"], d["target"], d["t"], d["mask"], beta=beta)
        ctl = sft_t2_terms(b, d["reference"], d["target"], d["t"], d["mask"], beta=beta)
        ipa.loss.backward()
        ctl.loss.backward()
        same = torch.allclose(a.grad, b.grad, rtol=1e-3, atol=0)
        assert same == close, (beta, (a.grad - b.grad).abs().max().item())
        assert ipa.loss.item() == pytest.approx(ctl.loss.item(), rel=1e-6) if close else True


def test_kto_reference_point_comes_from_the_mismatched_pairs():
    d = batch(23)
    beta, hw = 2.0, 10.0
    g = torch.Generator().manual_seed(5)
    kl_pol = torch.rand(4, generator=g, dtype=torch.float64)
    kl_ref = kl_pol + torch.tensor([0.3, -0.1, 0.2, 0.4], dtype=torch.float64)  # the reference fits them worse
    desirable = torch.tensor([True, False, True])
    terms = kto_terms(d["policy"], d["reference"], d["target"], d["t"], desirable, d["mask"],
                      kl_policy_err=kl_pol, kl_reference_err=kl_ref, beta=beta, hand_weight=hw)
    z0 = max(sum(beta * (kl_ref[j].item() - kl_pol[j].item()) for j in range(4)) / 4, 0.0)
    assert terms.kl.item() == pytest.approx(z0, rel=1e-12) and z0 > 0
    loss = 0.0
    for b in range(B):
        r = beta * (loop_err(d["reference"][b], d["target"][b], d["mask"][b], hw)
                    - loop_err(d["policy"][b], d["target"][b], d["mask"][b], hw))
        loss += 1 - loop_sigmoid(r - z0 if desirable[b] else z0 - r)
    assert terms.loss.item() == pytest.approx(loss / B, rel=1e-12)
    # a KL cannot be negative: a policy that fits the mismatched pairs better clamps at 0
    assert kto_terms(d["policy"], d["reference"], d["target"], d["t"], desirable, kl_policy_err=kl_ref,
                     kl_reference_err=kl_pol, beta=beta).kl.item() == 0.0
    with pytest.raises(ValueError, match="come together"):
        kto_terms(d["policy"], d["reference"], d["target"], d["t"], desirable, kl_policy_err=kl_pol)


def test_saturation_diagnostics():
    d = batch(24, pol_noise=0.1, ref_noise=0.6)  # the policy fits far better: large gains
    low = ipa_terms(d["policy"], d["reference"], d["target"], torch.zeros(B, dtype=torch.float64), d["mask"], beta=1e-6).metrics()
    high = ipa_terms(d["policy"], d["reference"], d["target"], torch.zeros(B, dtype=torch.float64), d["mask"], beta=1e6).metrics()
    assert low["saturated"] == 0.0 and high["saturated"] == 1.0
    terms = ipa_terms(d["policy"], d["reference"], d["target"], d["t"], d["mask"], beta=600.0)
    m = terms.metrics()
    want = sum(torch.sigmoid(-terms.logits[b]).item() < SATURATED for b in range(B)) / B
    assert m["saturated"] == pytest.approx(want)
    assert m["logits_p10"] <= m["logits_p50"] <= m["logits_p90"]
    rel = sum(terms.gain[b].item() / terms.reference_err[b].item() for b in range(B)) / B
    assert m["rel_gain"] == pytest.approx(rel, rel=1e-6)


def test_dpo_pairs_are_pass_vs_fail_with_a_margin():
    import numpy as np

    from ipa_lib.stages.train import dpo_pair_indices

    pose = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "e"])
    score = np.array([0.9, 0.2,   # a: pass vs fail           -> kept
                      0.8, 0.78,  # b: pass vs pass            -> dropped
                      0.3, 0.1,   # c: fail vs fail            -> dropped
                      0.76, 0.74,  # d: pass vs fail, margin .02 -> dropped at margin 0.05
                      0.99])      # e: alone
    w, l = dpo_pair_indices(pose, score, threshold=0.75, min_margin=0.05)
    assert (w.tolist(), l.tolist()) == ([0], [1])
    w, l = dpo_pair_indices(pose, score, threshold=0.75, min_margin=0.0)
    assert (w.tolist(), l.tolist()) == ([0, 6], [1, 7])
    w, l = dpo_pair_indices(pose, score)  # no filter: every strictly ordered pair (the old rule)
    assert (w.tolist(), l.tolist()) == ([0, 2, 4, 6], [1, 3, 5, 7])


def test_kto_trainer_builds_the_mismatched_pairs_from_the_batch():
    """`mismatched_errors` denoises clip b under clip b-1's conditioning: on a toy model whose
    velocity is the conditioning itself, the error equals the loop over the rolled pairs."""
    import torch

    from ipa_lib.stages.train import mismatched_errors

    class Echo:  # predict_velocity returns the conditioning; the reference returns 0
        ref = False

        def predict_velocity(self, x_t, t, cond):
            return torch.zeros_like(x_t) if self.ref else cond["c"]

        def reference_model(self):
            import contextlib

            echo = self

            @contextlib.contextmanager
            def ctx():
                echo.ref = True
                yield
                echo.ref = False

            return ctx()

    d = batch(25)
    cond = {"c": d["policy"], "text": torch.zeros(B, 1, 4, dtype=torch.float64)}
    pol, ref = mismatched_errors(Echo(), d["target"], d["t"], d["target"], cond, d["mask"], 10.0)
    for b in range(B):
        assert pol[b].item() == pytest.approx(loop_err(d["policy"][(b - 1) % B], d["target"][b], d["mask"][b], 10.0), rel=1e-12)
        assert ref[b].item() == pytest.approx(loop_err(torch.zeros_like(d["target"][b]), d["target"][b], d["mask"][b], 10.0), rel=1e-12)
