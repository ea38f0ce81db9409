"""Hand masks: keypoint boxes/hulls, masks on real detected hands, pixel -> Wan latent grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hands_fixtures import detector, hand_model, photo, zoom_pan_clip  # noqa: F401

from ipa_lib.data.hands.masks import detections_mask, hands_to_keypoints, keypoints_mask, pixel_mask_to_latent

# ---------------------------------------------------------------------------- latent grid


def _reference_pool(mask: np.ndarray, tf: int, s: int) -> np.ndarray:
    """Loop version of the Wan rule, for (B, F, H, W)."""
    b, f, h, w = mask.shape
    groups = [[0]] + [list(range(1 + k * tf, 1 + (k + 1) * tf)) for k in range((f - 1) // tf)]
    out = np.zeros((b, len(groups), math.ceil(h / s), math.ceil(w / s)), mask.dtype)
    for n in range(b):
        for g, frames in enumerate(groups):
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    out[n, g, i, j] = mask[n, frames, i * s : (i + 1) * s, j * s : (j + 1) * s].max()
    return out


@pytest.mark.parametrize("frames", [1, 5, 9, 81])
@pytest.mark.parametrize("hw", [(32, 48), (33, 47), (7, 9), (480 // 4, 832 // 4)])
def test_latent_shapes(frames, hw):
    h, w = hw
    m = torch.zeros(2, frames, h, w)
    out = pixel_mask_to_latent(m)
    assert out.shape == (2, 1 + (frames - 1) // 4, math.ceil(h / 8), math.ceil(w / 8))
    assert pixel_mask_to_latent(m[0]).shape == out.shape[1:]  # (F, H, W) in, no batch out


def test_latent_matches_loop_reference_on_random_sparse_masks():
    rng = np.random.default_rng(0)
    for f, h, w in [(9, 17, 23), (5, 8, 8), (13, 31, 9), (1, 5, 5)]:
        m = (rng.random((2, f, h, w)) > 0.97).astype(np.float32) * rng.random((2, f, h, w)).astype(np.float32)
        got = pixel_mask_to_latent(torch.from_numpy(m)).numpy()
        np.testing.assert_array_equal(got, _reference_pool(m, 4, 8))


@pytest.mark.parametrize(
    "frame, latent",
    [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (80, 20)],  # first alone, then groups 1-4, 5-8, ...
)
def test_single_pixel_lands_in_the_right_cell(frame, latent):
    m = torch.zeros(81, 33, 47)
    m[frame, 32, 46] = 1.0  # bottom-right pixel: in the zero-padded partial cell
    out = pixel_mask_to_latent(m)
    assert out.sum() == 1 and out[latent, 4, 5] == 1


def test_identity_and_4k1_rule():
    m = torch.rand(1, 6, 5, 7)
    assert torch.equal(pixel_mask_to_latent(m, 1, 1), m)
    with pytest.raises(ValueError, match=r"frame count 6 is not 4k\+1"):
        pixel_mask_to_latent(m)
    dropped = pixel_mask_to_latent(m, require_4k1=False)  # like Wan's VAE: trailing frame dropped
    assert dropped.shape == (1, 2, 1, 1)
    assert dropped[0, 1, 0, 0] == m[0, 1:5].max()
    with pytest.raises(ValueError, match=r"\(B, F, H, W\)"):
        pixel_mask_to_latent(torch.zeros(5, 5))


# ---------------------------------------------------------------------------- keypoint masks


def _hand(points: list[tuple[float, float]], score: float = 1.0) -> np.ndarray:
    kp = np.zeros((21, 3), np.float32)
    for i, (x, y) in enumerate(points):
        kp[i] = (x, y, score)
    return kp


def test_box_mask_exact_pixels():
    kp = np.zeros((1, 2, 21, 3), np.float32)
    kp[0, 0] = _hand([(10, 20), (30, 30)])  # box 20 x 10, longer side 20
    m = keypoints_mask(kp, 64, 64, dilate=0.25)  # grown by 5 px: x [5, 35), y [15, 35)
    assert m.shape == (1, 64, 64) and m.dtype == np.float32
    ys, xs = np.nonzero(m[0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 34, 15, 34)
    # an invisible hand (score 0, like OpenPose's missing points) adds nothing
    kp[0, 1] = _hand([(50, 50), (60, 60)], score=0.0)
    assert np.array_equal(keypoints_mask(kp, 64, 64), m)


def test_min_size_border_clip_and_frames():
    kp = np.zeros((3, 2, 21, 3), np.float32)
    kp[0, 0] = _hand([(10, 10)])  # one point: a min_size x min_size box
    kp[1, 1] = _hand([(1, 1), (70, 3)])  # runs past the right/top border: clipped
    m = keypoints_mask(kp, 32, 48, dilate=0.0, min_size=3)
    assert m[0].sum() == 9 and m[0, 8:11, 8:11].all()  # box [8.5, 11.5): pixel centres 8.5-10.5
    assert m[1].any() and m[1, :, 47].any() and m[1, 0].any()
    assert not m[2].any()  # no hands in frame 2
    with pytest.raises(ValueError, match=r"\(F, K, 21, 3\)"):
        keypoints_mask(np.zeros((3, 21, 3)), 32, 32)


def test_hull_inside_box_and_covers_keypoints():
    rng = np.random.default_rng(0)
    kp = np.zeros((1, 2, 21, 3), np.float32)
    kp[0, 0, :, :2] = rng.uniform(20, 60, (21, 2))
    kp[0, 0, :, 2] = 1
    box = keypoints_mask(kp, 80, 80, dilate=0.1)
    hull = keypoints_mask(kp, 80, 80, dilate=0.1, shape="hull")
    import cv2

    grown = cv2.dilate(box[0], np.ones((3, 3), np.uint8))  # one pixel of rasterisation slack
    assert 0 < hull.sum() < box.sum() and np.all(hull[0] <= grown)
    px = np.floor(kp[0, 0, :, :2]).astype(int)
    assert hull[0, px[:, 1], px[:, 0]].all()


# ---------------------------------------------------------------------------- real hands


def test_masks_land_on_detected_hands(detector):
    """The mask around real detections holds the hands: a crop of it is detected as a hand again."""
    img = photo("428")
    dets = [detector.detect_image(img)]
    assert len(dets[0]) == 2
    h, w = img.shape[:2]
    mask = detections_mask(dets, h, w, dilate=0.25)[0]
    assert 0 < mask.mean() < 0.08  # two hands, a small part of the photo
    for hand in dets[0]:
        px = np.clip(np.floor(hand.landmarks[:, :2]).astype(int), 0, [w - 1, h - 1])
        assert mask[px[:, 1], px[:, 0]].all()
    # each connected blob of the mask, cropped with some context and enlarged, shows a hand
    import cv2
    from PIL import Image

    n, labels = cv2.connectedComponents(mask.astype(np.uint8))
    assert n - 1 == 2
    found = 0
    for k in range(1, n):
        ys, xs = np.nonzero(labels == k)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        my, mx = (y1 - y0) // 2, (x1 - x0) // 2
        crop = img[max(0, y0 - my) : y1 + my, max(0, x0 - mx) : x1 + mx]
        big = np.asarray(Image.fromarray(crop).resize((crop.shape[1] * 3, crop.shape[0] * 3), Image.BICUBIC))
        found += len(detector.detect_image(big)) >= 1
    assert found == 2
    # and on the latent grid the hands survive as a few cells
    lat = pixel_mask_to_latent(torch.from_numpy(mask[None]), require_4k1=True)
    assert lat.shape == (1, math.ceil(h / 8), math.ceil(w / 8)) and 0 < lat.sum() < lat.numel() * 0.15


def test_video_detections_mask(detector):
    clip = zoom_pan_clip(photo("536"), 5)
    dets = detector.detect_frames(clip, fps=16)
    kp = hands_to_keypoints(dets)
    assert kp.shape == (5, 2, 21, 3)
    m = detections_mask(dets, clip.shape[1], clip.shape[2], shape="hull")
    assert m.shape == clip.shape[:3]
    for f, d in enumerate(dets):
        assert m[f].any() == bool(d)
    lat = pixel_mask_to_latent(torch.from_numpy(m)[None])
    assert lat.shape == (1, 2, math.ceil(clip.shape[1] / 8), math.ceil(clip.shape[2] / 8))
