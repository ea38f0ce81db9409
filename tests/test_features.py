"""Frechet distance (hand-computed cases, scipy.linalg.sqrtm), the hand-region view, and the toy feature extractor."""

from __future__ import annotations

import numpy as np
import pytest

from ipa_lib.analysis.features import (
    FeatureExtractor,
    clip_frechet,
    feature_corpus,
    frechet_distance,
    hand_view,
    train_extractor,
)


def test_identical_sets_have_zero_distance():
    x = np.random.default_rng(0).normal(size=(50, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_shifted_means_give_the_squared_shift():
    x = np.random.default_rng(1).normal(size=(40, 5))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(x, x + shift) == pytest.approx(float((shift**2).sum()), rel=1e-9)


def test_one_dimensional_case_by_hand():
    # N(mu, s^2) vs N(nu, r^2): FD = (mu - nu)^2 + (s - r)^2
    a = np.array([[0.0], [2.0]])  # mean 1, variance (ddof=1) 2
    b = np.array([[0.0], [4.0]])  # mean 2, variance 8
    assert frechet_distance(a, b) == pytest.approx(1.0 + (np.sqrt(2) - np.sqrt(8)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(3.0)


def test_diagonal_covariances_by_hand():
    # independent axes: FD = |dmu|^2 + sum_i (s_i - r_i)^2
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4000, 3))
    z = np.linalg.qr(z - z.mean(0))[0] * np.sqrt(len(z) - 1)  # zero mean, covariance exactly I
    s, r = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 1.0])
    mu = np.array([0.0, 1.0, -1.0])
    got = frechet_distance(z * s, z * r + mu)
    assert got == pytest.approx(float((mu**2).sum() + ((s - r) ** 2).sum()), rel=1e-6)


def test_symmetric_and_rank_deficient():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(7, 16)) + 0.3  # N < D: singular covariances
    d1, d2 = frechet_distance(a, b), frechet_distance(b, a)
    assert np.isfinite(d1) and d1 == pytest.approx(d2, rel=1e-8)


def sqrtm_fd(a: np.ndarray, b: np.ndarray) -> complex:
    """The textbook formula with scipy.linalg.sqrtm(S_a S_b) (pytorch-fid, without its eps retry)."""
    from scipy.linalg import sqrtm

    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(sqrtm(sa @ sb))


@pytest.mark.parametrize("n,d", [(200, 8), (50, 16), (30, 3)])
def test_matches_scipy_sqrtm_on_full_rank_data(n, d):
    rng = np.random.default_rng(n + d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))  # correlated axes
    b = rng.normal(size=(n + 5, d)) * 2.0 + 0.3
    ref = sqrtm_fd(a, b)
    assert abs(np.imag(ref)) < 1e-9  # sqrtm is real here: the formulas must agree
    assert frechet_distance(a, b) == pytest.approx(float(np.real(ref)), rel=1e-9)  # measured: <= 1e-13 relative


@pytest.mark.parametrize("n", [5, 7])
def test_rank_deficient_stays_real_where_sqrtm_drifts(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 16)) @ rng.normal(size=(16, 16))  # N < D: singular covariances
    b = rng.normal(size=(n + 2, 16)) + 0.3
    got = frechet_distance(a, b)
    assert isinstance(got, float) and np.isfinite(got) and got > 0
    # sqrtm's answer carries round-off imaginary parts here (scipy 1.17: ~1e-7); its real part agrees
    assert got == pytest.approx(float(np.real(sqrtm_fd(a, b))), rel=1e-6)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((3, 2)))


def test_any_callable_is_an_extractor():
    rng = np.random.default_rng(4)
    clips = rng.integers(0, 255, size=(10, 2, 4, 4, 3), dtype=np.uint8)

    def mean_colour(c):  # (N, F, H, W, 3) -> (N, 3)
        return c.reshape(len(c), -1, 3).mean(1)

    brighter = np.clip(clips.astype(int) + 10, 0, 255).astype(np.uint8)
    assert clip_frechet(mean_colour, clips, clips) == pytest.approx(0.0, abs=1e-9)
    expected = frechet_distance(mean_colour(clips), mean_colour(brighter))
    assert clip_frechet(mean_colour, clips, brighter) == pytest.approx(expected)
    assert expected > 0


def test_hand_view_is_centred_on_the_driving_palms():
    from ipa_lib.data.toyworld import make_clip, palm_centre

    clip = make_clip(123, frames=5, size=32)
    view = hand_view(clip.video[None], clip.hand_keypoints[None])
    assert view.shape == (1, 5, 16, 32, 3)
    # the palm colour (bright) sits at the centre of both crops; corners are not the hand
    for side in range(2):
        centre = view[0, 0, 8, side * 16 + 8].astype(int)
        corner = view[0, 0, 0, side * 16].astype(int)
        assert centre.sum() > corner.sum() + 150
    # a hand at the frame border: the crop is padded with zeros, never wraps around
    kp = clip.hand_keypoints[None].copy()
    kp[..., 0] -= palm_centre(kp[0, 0, 0])[0]  # left palm on x = 0
    edge = hand_view(clip.video[None], kp)
    assert (edge[0, 0, :, :7] == 0).all()


def test_extractor_trains_deterministically_and_round_trips(tmp_path):
    corpus = feature_corpus(24, frames=5, size=16)
    assert set(np.unique(corpus["label"])) <= set(range(5)) and (corpus["label"] == 0).sum() == 12
    a = train_extractor("hands", corpus, steps=4, batch_size=8, channels=4, feature_dim=6)
    b = train_extractor("hands", corpus, steps=4, batch_size=8, channels=4, feature_dim=6)
    views = hand_view(corpus["video"], corpus["hand_keypoints"])
    fa = a(views)
    assert fa.shape == (24, 6) and fa.dtype == np.float64
    np.testing.assert_array_equal(fa, b(views))  # same seed, same features
    a.save(tmp_path / "hands")
    loaded = FeatureExtractor.load(tmp_path / "hands")
    np.testing.assert_array_equal(loaded(views), fa)
    assert loaded.cfg.kind == "hands" and "val_accuracy" in loaded.cfg.train
    full = train_extractor("full", corpus, steps=2, batch_size=8, channels=4, feature_dim=6)
    assert full(corpus["video"]).shape == (24, 6) and full.cfg.regress_dim == 20


def test_missing_extractor_is_a_clear_error(tmp_path):
    from ipa_lib.analysis.features import load_extractors

    with pytest.raises(FileNotFoundError, match="no feature extractor"):
        load_extractors(tmp_path / "nope", 5, 16, train_if_missing=False)
