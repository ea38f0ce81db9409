"""The embedded toy world: upper-body figures whose five-fingered hands can go wrong.

A clip is a figure (torso, head, two arms, palms with five fingers) moving its arms
along a driving pose. Everything is drawn at 4x resolution with PIL and box-downsampled,
so thin fingers survive as anti-aliased strokes at 32x32.

The pretraining corpus corrupts the hands of a fraction of clips the ways the paper
describes animators failing (wrong finger count, melted palms, blur, jitter) while the
driving pose stays correct, so a model pretrained on it really learns to make hand
errors on mostly right bodies.

Keypoints per hand follow the MediaPipe layout (wrist 0, thumb 1-4, index 5-8, middle
9-12, ring 13-16, pinky 17-20), in pixels, hands ordered (left, right) as seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SS = 4  # supersampling factor for drawing
FINGER_ANGLES = np.deg2rad([-75.0, -37.5, 0.0, 37.5, 75.0])  # thumb .. pinky, around the forearm axis
PALM_OFFSET = 1.3  # palm centre this far past the wrist along the forearm (pixels at size 32)
PALM_RADIUS = 1.8
FINGER_START, FINGER_END = 1.8, 5.5  # finger segment, distance from the palm centre
CORRUPTIONS = ("fingers", "melt", "blur", "jitter")


@dataclass(frozen=True)
class Identity:
    """Colours of one figure (RGB uint8). Hands have their own hue so they can be found."""

    background: tuple[int, int, int]
    shirt: tuple[int, int, int]
    face: tuple[int, int, int]
    hand: tuple[int, int, int]


@dataclass
class Clip:
    reference: np.ndarray  # (H, W, 3) uint8, the figure at rest
    video: np.ndarray  # (F, H, W, 3) uint8
    pose: np.ndarray  # (F, H, W, 3) uint8 rendered driving pose
    hand_keypoints: np.ndarray  # (F, 2, 21, 3) float32 [x, y, visible] in pixels
    corruption: str  # "" for a clean clip


def _scale(size: int) -> float:
    return size / 32.0


def sample_identity(rng: np.random.Generator) -> Identity:
    def colour(lo: int, hi: int) -> tuple[int, int, int]:
        return tuple(int(c) for c in rng.integers(lo, hi, size=3))

    background = colour(10, 70)  # dark
    shirt = tuple(int(c) for c in rng.permutation([int(rng.integers(40, 120)), int(rng.integers(120, 200)), int(rng.integers(0, 50))]))
    face = (int(rng.integers(150, 200)), int(rng.integers(110, 150)), int(rng.integers(80, 110)))
    hand = (int(rng.integers(215, 256)), int(rng.integers(200, 240)), int(rng.integers(150, 200)))  # bright
    return Identity(background, shirt, face, hand)


def sample_motion(rng: np.random.Generator, frames: int, motion: float = 1.0) -> np.ndarray:
    """Arm angles over time, (F, 2, 2): per arm (upper arm, forearm) directions in radians.

    Angles are measured from straight down, outwards. The ranges keep both hands raised
    beside the head and inside the frame, each in its own half; start and end poses are
    random and the arm eases between them.
    """
    lo, hi = np.array([1.2, 2.4]), np.array([1.9, 2.8])
    start = rng.uniform(lo, hi, size=(2, 2))
    end = np.clip(start + motion * rng.uniform(-0.35, 0.35, size=(2, 2)), lo, hi)
    s = 0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, frames))
    return (start[None] + s[:, None, None] * (end - start)[None]).astype(np.float32)


REST_POSE = np.array([[0.3, 0.4], [0.3, 0.4]], dtype=np.float32)  # arms down, for the reference


def skeleton(angles: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Joint positions (pixels) for one frame. angles (2, 2) -> body (8, 2), hands (2, 21, 2).

    body rows: head, neck, then (shoulder, elbow, wrist) for the left and the right arm.
    """
    k = _scale(size)
    head = np.array([16.0, 10.0]) * k
    neck = np.array([16.0, 14.0]) * k
    shoulders = np.array([[13.5, 17.0], [18.5, 17.0]]) * k
    body = [head, neck]
    hands = np.zeros((2, 21, 2), dtype=np.float32)
    for side in range(2):
        sign = -1.0 if side == 0 else 1.0  # left arm goes out to the left
        a_up, a_fore = angles[side]
        upper = 4.0 * k * np.array([sign * math.sin(a_up), math.cos(a_up)])
        fore = 3.5 * k * np.array([sign * math.sin(a_fore), math.cos(a_fore)])
        elbow = shoulders[side] + upper
        wrist = elbow + fore
        body += [shoulders[side], elbow, wrist]
        axis = math.atan2(fore[1], fore[0])
        palm = wrist + PALM_OFFSET * k * np.array([math.cos(axis), math.sin(axis)])
        hands[side, 0] = wrist
        for f, phi in enumerate(FINGER_ANGLES):
            a = axis - sign * phi  # mirrored so the thumb is on the inside for both hands
            d = np.array([math.cos(a), math.sin(a)])
            for j, r in enumerate(np.linspace(FINGER_START, FINGER_END, 4)):
                hands[side, 1 + 4 * f + j] = palm + r * k * d
    return {"body": np.stack(body).astype(np.float32), "hands": hands}


def palm_centre(hand: np.ndarray) -> np.ndarray:
    """(…, 21, 2+) MediaPipe-layout hand -> (…, 2) palm centre.

    The middle finger lies on the forearm axis, so the centre is its base pulled back
    towards the wrist by FINGER_START (in the hand's own scale).
    """
    wrist, base = hand[..., 0, :2], hand[..., 9, :2]
    axis = base - wrist
    axis = axis / (np.linalg.norm(axis, axis=-1, keepdims=True) + 1e-6)
    return base - axis * FINGER_START * hand_scale(hand)[..., None]


def hand_scale(hand: np.ndarray) -> np.ndarray:
    """Pixels per toy unit, recovered from the middle finger's length in the keypoints."""
    length = np.linalg.norm(hand[..., 12, :2] - hand[..., 9, :2], axis=-1)
    return length / (FINGER_END - FINGER_START)


def _draw_line(draw: ImageDraw.ImageDraw, a, b, colour, width: float) -> None:
    draw.line([tuple(a * SS), tuple(b * SS)], fill=colour, width=max(1, int(round(width * SS))))


def _draw_disc(draw: ImageDraw.ImageDraw, c, r: float, colour) -> None:
    x, y = c * SS
    draw.ellipse([x - r * SS, y - r * SS, x + r * SS, y + r * SS], fill=colour)


def _draw_hand(draw, hand: np.ndarray, colour, k: float, corruption: str, rng: np.random.Generator | None) -> None:
    palm = palm_centre(hand)
    if corruption == "melt":  # a fingerless blob, larger than a palm
        _draw_disc(draw, palm + (hand[9, :2] - palm) * 0.35, (PALM_RADIUS + 2.2) * k, colour)
        return
    _draw_disc(draw, palm, PALM_RADIUS * k, colour)
    tips = [hand[4 * f + 4, :2] for f in range(5)]
    bases = [hand[4 * f + 1, :2] for f in range(5)]
    if corruption == "fingers" and rng is not None:
        n = int(rng.choice([2, 3, 4, 6, 7]))
        if n < 5:
            keep = sorted(rng.choice(5, size=n, replace=False))
            tips, bases = [tips[i] for i in keep], [bases[i] for i in keep]
        else:  # extra fingers squeezed in between the real ones or past thumb and pinky
            d_tips = np.stack(tips) - palm
            angles = np.arctan2(d_tips[:, 1], d_tips[:, 0])
            step = np.angle(np.exp(1j * (angles[1] - angles[0])))
            slots = np.concatenate([angles[:-1] + step / 2, [angles[0] - step, angles[-1] + step]])
            for a in rng.choice(slots, size=n - 5, replace=False) + rng.normal(0.0, 0.08, size=n - 5):
                d = np.array([math.cos(a), math.sin(a)])
                bases.append(palm + FINGER_START * k * d)
                tips.append(palm + FINGER_END * k * d)
    for b, t in zip(bases, tips):
        _draw_line(draw, palm + (b - palm) * 0.5, t, colour, 1.2 * k)


def render_frame(
    identity: Identity,
    angles: np.ndarray,
    size: int,
    corruption: str = "",
    corrupt_sides: tuple[bool, bool] = (False, False),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one frame. Returns (H, W, 3) uint8 and the *driving* hand keypoints (2, 21, 2)."""
    k = _scale(size)
    sk = skeleton(angles, size)
    img = Image.new("RGB", (size * SS, size * SS), identity.background)
    draw = ImageDraw.Draw(img)
    body = sk["body"]
    draw.rectangle([12.5 * k * SS, 16.0 * k * SS, 19.5 * k * SS, size * SS], fill=identity.shirt)
    _draw_disc(draw, body[0], 2.8 * k, identity.face)
    sleeve = tuple(int(c * 0.8) for c in identity.shirt)
    for side in range(2):
        s, e, w = body[2 + 3 * side : 5 + 3 * side]
        _draw_line(draw, s, e, sleeve, 1.8 * k)
        _draw_line(draw, e, w, sleeve, 1.5 * k)
    drawn = sk["hands"].copy()
    if corruption == "jitter" and rng is not None:
        for side in range(2):
            if corrupt_sides[side]:
                drawn[side] += rng.uniform(-2.5, 2.5, size=2).astype(np.float32) * k
    for side in range(2):
        bad = corrupt_sides[side] and corruption in ("fingers", "melt")
        _draw_hand(draw, drawn[side], identity.hand, k, corruption if bad else "", rng)
    if corruption == "blur":
        blurred = img.filter(ImageFilter.GaussianBlur(radius=1.6 * k * SS))
        mask = Image.new("L", img.size, 0)
        mdraw = ImageDraw.Draw(mask)
        for side in range(2):
            if corrupt_sides[side]:
                _draw_disc(mdraw, palm_centre(drawn[side]), (FINGER_END + 1.5) * k, 255)
        img = Image.composite(blurred, img, mask)
    frame = np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)
    return frame, sk["hands"]


def render_pose(angles: np.ndarray, size: int) -> np.ndarray:
    """Driving-pose map (H, W, 3) uint8: R body skeleton, G left hand, B right hand."""
    k = _scale(size)
    sk = skeleton(angles, size)
    channels = []
    body = sk["body"]
    img = Image.new("L", (size * SS, size * SS), 0)
    d = ImageDraw.Draw(img)
    _draw_line(d, body[0], body[1], 255, 1.0 * k)
    for side in range(2):
        s, e, w = body[2 + 3 * side : 5 + 3 * side]
        _draw_line(d, body[1], s, 255, 1.0 * k)
        _draw_line(d, s, e, 255, 1.0 * k)
        _draw_line(d, e, w, 255, 1.0 * k)
    channels.append(img)
    for side in range(2):
        img = Image.new("L", (size * SS, size * SS), 0)
        d = ImageDraw.Draw(img)
        hand = sk["hands"][side]
        for f in range(5):
            pts = [hand[0]] + [hand[1 + 4 * f + j] for j in range(4)]
            for a, b in zip(pts[:-1], pts[1:]):
                _draw_line(d, a, b, 255, 0.7 * k)
        channels.append(img)
    rgb = Image.merge("RGB", channels).resize((size, size), Image.BOX)
    return np.asarray(rgb, dtype=np.uint8)


def make_clip(seed: int, frames: int = 5, size: int = 32, corrupt: bool = False, motion: float = 1.0) -> Clip:
    """One clip, fully determined by `seed` (and whether its hands are corrupted)."""
    rng = np.random.default_rng(seed)
    identity = sample_identity(rng)
    angles = sample_motion(rng, frames, motion)
    corruption, sides = "", (False, False)
    if corrupt:
        corruption = str(rng.choice(CORRUPTIONS))
        which = int(rng.integers(0, 3))  # left, right or both
        sides = (which != 1, which != 0)
    video, pose, kps = [], [], []
    for f in range(frames):
        frame, hands = render_frame(identity, angles[f], size, corruption, sides, rng)
        video.append(frame)
        pose.append(render_pose(angles[f], size))
        kps.append(hands)
    reference, _ = render_frame(identity, REST_POSE, size)
    hand_keypoints = np.concatenate([np.stack(kps), np.ones((frames, 2, 21, 1), np.float32)], axis=-1)
    return Clip(reference, np.stack(video), np.stack(pose), hand_keypoints.astype(np.float32), corruption)


def make_corpus(n: int, seed: int, frames: int, size: int, corrupt_fraction: float, motion: float = 1.0, progress: bool = True) -> dict[str, np.ndarray]:
    """`n` clips, clip i from seed `seed + i`; a `corrupt_fraction` of them with broken hands."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    corrupt = rng.random(n) < corrupt_fraction
    clips = [
        make_clip(seed + i, frames, size, bool(corrupt[i]), motion)
        for i in tqdm(range(n), desc="toy corpus", disable=not progress, leave=False)
    ]
    return stack_clips(clips)


def stack_clips(clips: list[Clip]) -> dict[str, np.ndarray]:
    return {
        "reference": np.stack([c.reference for c in clips]),
        "video": np.stack([c.video for c in clips]),
        "pose": np.stack([c.pose for c in clips]),
        "hand_keypoints": np.stack([c.hand_keypoints for c in clips]),
        "corrupted": np.array([bool(c.corruption) for c in clips]),
    }


SHIRT_COLOURS = ("shirt-red", "shirt-green", "shirt-blue")


def shirt_colour(reference: np.ndarray) -> str:
    """The identity's shirt colour, its dominant channel (`SHIRT_COLOURS`), read off a reference
    image (H, W, 3) uint8 at rest: the median of the torso below the chest (the shirt's
    channels are one low, one middle and one high value, so the argmax is unambiguous)."""
    k = reference.shape[0] / 32.0
    torso = reference[int(20 * k):int(30 * k), int(13 * k):int(19 * k)].reshape(-1, 3)
    return SHIRT_COLOURS[int(np.argmax(np.median(torso, axis=0)))]


def toy_conditions(first_seed: int, count: int, frames: int, size: int, motion: float) -> dict[str, np.ndarray]:
    """Reference images, pose videos and hand keypoints of `count` clean toy clips."""
    clips = [make_clip(first_seed + i, frames, size, corrupt=False, motion=motion) for i in range(count)]
    return {
        "reference": np.stack([c.reference for c in clips]),
        "pose": np.stack([c.pose for c in clips]),
        "hand_keypoints": np.stack([c.hand_keypoints for c in clips]),
        "target": np.stack([c.video for c in clips]),  # ground truth: evaluation only
    }
