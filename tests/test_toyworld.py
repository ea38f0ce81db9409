"""The toy world and its hand scorer: deterministic clips, hands in frame, and a scorer that
separates clean hands from every kind of corruption (judging pixels + driving pose only)."""

from __future__ import annotations

import numpy as np
import pytest

from ipa_lib.data.toy_quality import ToyHandScorer
from ipa_lib.data.toyworld import CORRUPTIONS, make_clip, make_corpus, palm_centre, skeleton


def test_clip_shapes_and_determinism():
    a, b = make_clip(7), make_clip(7)
    assert a.video.shape == (5, 32, 32, 3) and a.video.dtype == np.uint8
    assert a.pose.shape == (5, 32, 32, 3) and a.reference.shape == (32, 32, 3)
    assert a.hand_keypoints.shape == (5, 2, 21, 3)
    np.testing.assert_array_equal(a.video, b.video)
    assert not np.array_equal(make_clip(8).video, a.video)


def test_hands_stay_in_frame_and_apart():
    for seed in range(50):
        kp = make_clip(seed).hand_keypoints[..., :2]
        assert kp.min() >= 0 and kp.max() <= 32
        left, right = palm_centre(kp[:, 0]), palm_centre(kp[:, 1])
        assert (left[:, 0] < 16).all() and (right[:, 0] > 16).all()


def test_palm_centre_recovers_the_drawn_centre():
    sk = skeleton(np.array([[1.5, 2.6], [1.3, 2.5]], np.float32), 32)
    centre = palm_centre(sk["hands"])
    # finger bases sit FINGER_START from the centre
    d = np.linalg.norm(sk["hands"][:, [1, 5, 9, 13, 17]] - centre[:, None], axis=-1)
    np.testing.assert_allclose(d, 1.8, atol=1e-4)


def test_corpus_corrupts_the_requested_fraction():
    corpus = make_corpus(200, 0, 5, 32, 0.4, progress=False)
    assert 0.3 < corpus["corrupted"].mean() < 0.5


def test_scorer_separates_clean_from_corrupted_hands():
    scorer = ToyHandScorer()
    clean, broken = {}, {c: [] for c in CORRUPTIONS}
    seed = 0
    while min(len(v) for v in broken.values()) < 8:
        clip = make_clip(seed, corrupt=True)
        broken[clip.corruption].append(scorer.score(clip.video, clip.hand_keypoints)["hand_score"])
        seed += 1
    clean = [scorer.score(c.video, c.hand_keypoints)["hand_score"] for c in (make_clip(s) for s in range(1000, 1040))]
    assert np.mean(np.array(clean) >= 0.75) >= 0.95
    for kind, scores in broken.items():
        assert np.mean(np.array(scores) >= 0.75) <= 0.25, kind


def test_scorer_reports_components_in_range():
    clip = make_clip(3)
    out = ToyHandScorer().score(clip.video, clip.hand_keypoints)
    assert set(out) == {"hand_score", "score_presence", "score_fingers", "score_gaps", "score_stability"}
    assert all(0.0 <= v <= 1.0 for v in out.values())


def test_scorer_needs_the_driving_pose():
    clip = make_clip(3)
    with pytest.raises(ValueError, match="keypoints"):
        ToyHandScorer().score(clip.video, None)
    with pytest.raises(ValueError, match=r"\(F=5, 2, 21, 3\)"):
        ToyHandScorer().score(clip.video, clip.hand_keypoints[:3])
