"""Frechet distance between sets of clips, in the feature space of a small toy-world extractor.

FID / FID-VID compare the Gaussian fits of real and generated samples in the feature space
of a network trained on real data (Heusel et al. 2017, arXiv:1706.08500; FID-VID as in
DisCo, arXiv:2307.00040). Inception does not know toy figures, so the project trains its
own extractor on the toy world:

- `FeatureNet`: a tiny 3D conv net over (F, H, W) clips with a `feature_dim` bottleneck,
  trained to say which corruption a clip's hands carry (clean / extra-or-missing fingers /
  melted / blurred / jittered, the failure modes the paper names) and, for the full-frame
  extractor, where the wrists are (so the features see the body pose too).
- "full": whole clips (N, F, H, W, 3). "hands": `hand_view` crops centred on the driving
  pose's palms, left | right side by side (N, F, c, 2c, 3): the hand-region variant.

Everything downstream is pluggable: `frechet_distance(feats_a, feats_b)` is a pure function
of two feature matrices, and `clip_frechet(extract, clips_a, clips_b)` takes *any* callable
mapping uint8 clips (N, F, H, W, 3) to (N, D) features (a `FeatureExtractor`, an I3D
wrapper, a lambda in a test).

Training clips come from toy-world seeds `FEATURE_SEED + i`, a range that pretraining
(seed 0 + i), sampling (1000 + i) and evaluation (99 000 + i) never reach at their sizes.
Saved as `<dir>/config.json` + `<dir>/model.safetensors` (no pickles); `ipa features` trains both extractors from the command line.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CORRUPTION_CLASSES = ("", "fingers", "melt", "blur", "jitter")  # "" = clean hands
FEATURE_SEED = 5_000_000
KINDS = ("full", "hands")

Extractor = Callable[[np.ndarray], np.ndarray]  # (N, F, H, W, 3) uint8 -> (N, D) float


# ---- the distance ------------------------------------------------------------------------

# Why not `scipy.linalg.sqrtm(S_a @ S_b)` as pytorch-fid: S_a S_b is not symmetric, and with
# rank-deficient covariances (fewer clips than feature dimensions: small evaluation sets and
# their bootstrap resamples) sqrtm returns a complex matrix (imaginary parts ~1e-7 for 5 or 7
# samples in 16 dimensions), which is why pytorch-fid carries an eps retry for non-finite
# roots and a rule for discarding imaginary parts. The symmetric PSD form used here, by
# eigendecomposition, is real by construction and agrees with sqrtm where sqrtm is real
# (tests/test_features.py checks both).
def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples).

        FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)

    Covariances with ddof=1, as pytorch-fid. The trace term is computed from the symmetric
    PSD matrix S_a^1/2 S_b S_a^1/2 (eigendecomposition, negative round-off clipped), which
    equals tr((S_a S_b)^1/2) and stays real for rank-deficient covariances (N <= D).
    Identical sets give 0; sets that differ by a constant shift s give |s|^2.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_covmean = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # round-off can leave -1e-12 for identical sets


def clip_frechet(extract: Extractor, clips_a: np.ndarray, clips_b: np.ndarray) -> float:
    """Frechet distance between two clip sets in the feature space of any `extract` callable."""
    return frechet_distance(extract(clips_a), extract(clips_b))


# ---- hand region -------------------------------------------------------------------------

def hand_crop_size(size: int) -> int:
    """Side of one hand crop: 16 px at the default 32 px toy size (fingers reach 5.5 px)."""
    return max(4, int(round(16 * size / 32)))


def hand_view(clips: np.ndarray, hand_keypoints: np.ndarray, crop: int | None = None) -> np.ndarray:
    """Crops centred on each driving hand's palm, left | right: (N, F, H, W, 3) -> (N, F, c, 2c, 3).

    `hand_keypoints` (N, F, 2, 21, 3) are the *driving pose's* (MediaPipe layout, pixels), so
    a hand drawn in the wrong place (jitter) or not at all shows up in the crop. Outside the
    frame the crop is zero (black, like the toy background's dark colours).
    """
    from ipa_lib.data.toyworld import palm_centre

    clips = np.asarray(clips)
    if clips.ndim != 5 or hand_keypoints.shape[:3] != (*clips.shape[:2], 2):
        raise ValueError(f"clips (N, F, H, W, 3) and hand_keypoints (N, F, 2, 21, 3) must agree, got {clips.shape} and {hand_keypoints.shape}")
    n, f, h, w, _ = clips.shape
    c = crop or hand_crop_size(h)
    pad = c
    padded = np.zeros((n, f, h + 2 * pad, w + 2 * pad, 3), clips.dtype)
    padded[:, :, pad : pad + h, pad : pad + w] = clips
    centres = palm_centre(hand_keypoints[..., :2])  # (N, F, 2, 2) x, y in pixels
    x0 = np.floor(centres[..., 0] - c / 2).astype(int) + pad
    y0 = np.floor(centres[..., 1] - c / 2).astype(int) + pad
    x0, y0 = np.clip(x0, 0, w + pad), np.clip(y0, 0, h + pad)
    out = np.zeros((n, f, c, 2 * c, 3), clips.dtype)
    for i in range(n):
        for t in range(f):
            for s in range(2):
                ys, xs = y0[i, t, s], x0[i, t, s]
                out[i, t, :, s * c : (s + 1) * c] = padded[i, t, ys : ys + c, xs : xs + c]
    return out


# ---- the network -------------------------------------------------------------------------

@dataclass
class FeatureConfig:
    """Everything needed to rebuild a `FeatureNet`; stored in `config.json` beside the weights."""

    kind: str = "full"  # full | hands
    channels: int = 12  # width of the first conv; later layers use 2x
    feature_dim: int = 16  # D of the features FD is computed in (keep well below the set sizes)
    num_classes: int = len(CORRUPTION_CLASSES)
    regress_dim: int = 0  # full: 4 per frame (left/right wrist x, y), hands: 0
    frames: int = 5
    height: int = 32
    width: int = 32
    # training record (filled by `train_extractor`)
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


def _build(cfg: FeatureConfig):
    import torch
    from torch import nn

    class FeatureNet(nn.Module):
        """(B, 3, F, H, W) in [-1, 1] -> features (B, D); heads for the training labels."""

        def __init__(self, c: FeatureConfig):
            super().__init__()
            k = c.channels
            self.body = nn.Sequential(
                nn.Conv3d(3, k, (1, 3, 3), padding=(0, 1, 1)), nn.GELU(),
                nn.Conv3d(k, 2 * k, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
                nn.Conv3d(2 * k, 2 * k, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
                nn.AdaptiveAvgPool3d((1, 2, 2)),  # keep coarse layout: left/right, up/down
                nn.Flatten(),
            )
            self.bottleneck = nn.Linear(8 * k, c.feature_dim)
            self.classify = nn.Linear(c.feature_dim, c.num_classes)
            self.regress = nn.Linear(c.feature_dim, c.regress_dim) if c.regress_dim else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bottleneck(self.body(x))  # (B, D), no activation: FD fits a Gaussian

        def heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            h = nn.functional.gelu(feats)
            return self.classify(h), (self.regress(h) if self.regress is not None else None)

    return FeatureNet(cfg)


class FeatureExtractor:
    """A trained `FeatureNet` as a callable: uint8 clips (N, F, H, W, 3) -> (N, D) float64."""

    def __init__(self, net, cfg: FeatureConfig, batch_size: int = 128):
        self.net = net.eval()
        self.cfg = cfg
        self.batch_size = batch_size

    def __call__(self, clips: np.ndarray) -> np.ndarray:
        import torch

        from ipa_lib.data.tensors import video_to_tensor

        clips = np.asarray(clips)
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"clips must be (N, F, H, W, 3), got {clips.shape}")
        out = []
        with torch.no_grad():
            for lo in range(0, len(clips), self.batch_size):
                out.append(self.net(video_to_tensor(clips[lo : lo + self.batch_size])).double().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.cfg.feature_dim))

    def save(self, path: str | Path) -> Path:
        import safetensors.torch

        from ipa_lib.core.io import atomic_dir

        with atomic_dir(path) as tmp:
            safetensors.torch.save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2, sort_keys=True) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureExtractor":
        import safetensors.torch

        path = Path(path)
        if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"{path}: no feature extractor (config.json + model.safetensors); train one with `ipa features`")
        cfg = FeatureConfig(**json.loads((path / "config.json").read_text()))
        net = _build(cfg)
        try:
            net.load_state_dict(safetensors.torch.load_file(str(path / "model.safetensors")))
        except Exception as err:
            raise ValueError(f"{path}: cannot load feature extractor weights: {err}") from None
        return cls(net, cfg)


# ---- training ------------------------------------------------------------------------------

def feature_corpus(n: int, frames: int, size: int, motion: float = 1.0, seed: int = FEATURE_SEED) -> dict[str, np.ndarray]:
    """`n` labelled toy clips, half of them with corrupted hands (clip i from seed `seed + i`)."""
    from ipa_lib.data.toyworld import make_clip

    clips = [make_clip(seed + i, frames, size, corrupt=bool(i % 2), motion=motion) for i in range(n)]
    return {
        "video": np.stack([c.video for c in clips]),
        "hand_keypoints": np.stack([c.hand_keypoints for c in clips]),
        "label": np.array([CORRUPTION_CLASSES.index(c.corruption) for c in clips], dtype=np.int64),
        # wrists (F, 2 hands, x/y) scaled to [0, 1]: the body-pose target of the full extractor
        "wrists": np.stack([c.hand_keypoints[:, :, 0, :2].reshape(frames, 4) / size for c in clips]).astype(np.float32),
    }


def train_extractor(kind: str, corpus: dict[str, np.ndarray], *, steps: int = 300, batch_size: int = 64,
                    lr: float = 3e-3, seed: int = 0, channels: int = 12, feature_dim: int = 16,
                    holdout: float = 0.2) -> FeatureExtractor:
    """Train a `FeatureNet` on a labelled corpus (`feature_corpus`); deterministic for a seed.

    Loss: cross-entropy on the corruption class (+ MSE on the wrist positions for "full").
    A held-out fraction of the corpus gives the accuracy recorded in the config.
    """
    import torch

    from ipa_lib.data.tensors import video_to_tensor

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    video = corpus["video"] if kind == "full" else hand_view(corpus["video"], corpus["hand_keypoints"])
    n, f, h, w, _ = video.shape
    n_val = max(1, int(round(holdout * n))) if n > 4 else 0
    x = video_to_tensor(video)
    y = torch.from_numpy(corpus["label"])
    wr = torch.from_numpy(corpus["wrists"].reshape(n, -1))
    cfg = FeatureConfig(kind=kind, channels=channels, feature_dim=feature_dim,
                        regress_dim=wr.shape[1] if kind == "full" else 0, frames=f, height=h, width=w)
    net = _build(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    n_train = n - n_val
    started = time.time()
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, n_train, (min(batch_size, n_train),), generator=gen)
        feats = net(x[idx])
        logits, reg = net.heads(feats)
        loss = torch.nn.functional.cross_entropy(logits, y[idx])
        if reg is not None:
            loss = loss + 10.0 * torch.nn.functional.mse_loss(reg, wr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    record = {"steps": steps, "corpus": n, "seed": seed, "final_loss": round(float(loss.item()), 4),
              "seconds": round(time.time() - started, 1)}
    if n_val:
        with torch.no_grad():
            logits, reg = net.heads(net(x[n_train:]))
        record["val_accuracy"] = round(float((logits.argmax(1) == y[n_train:]).float().mean()), 4)
        record["val_clean_vs_corrupt_accuracy"] = round(float(((logits.argmax(1) > 0) == (y[n_train:] > 0)).float().mean()), 4)
        if reg is not None:
            record["val_wrist_rmse_px"] = round(float((reg - wr[n_train:]).pow(2).mean().sqrt()) * h, 3)
    cfg.train = record
    return FeatureExtractor(net, cfg)


def train_extractors(out: str | Path, frames: int, size: int, motion: float = 1.0, *, corpus_size: int = 1536,
                     steps: int = 300, seed: int = 0) -> dict[str, FeatureExtractor]:
    """Train and save both extractors under `out/full` and `out/hands`."""
    corpus = feature_corpus(corpus_size, frames, size, motion)
    out = Path(out)
    result = {}
    for kind in KINDS:
        ex = train_extractor(kind, corpus, steps=steps, seed=seed)
        ex.save(out / kind)
        result[kind] = ex
    return result


def load_extractors(root: str | Path, frames: int, size: int, motion: float = 1.0, *, train_if_missing: bool = True,
                    corpus_size: int = 1536, steps: int = 300) -> dict[str, FeatureExtractor]:
    """Both extractors from `root/{full,hands}`; trained (and saved) first when missing or
    trained for another clip size (`train_if_missing=False` makes that an error)."""
    root = Path(root)
    try:
        found = {kind: FeatureExtractor.load(root / kind) for kind in KINDS}
        if found["full"].cfg.height == size and found["full"].cfg.frames == frames:
            return found
        reason = f"trained for {found['full'].cfg.frames}x{found['full'].cfg.height}px clips, not {frames}x{size}px"
    except FileNotFoundError as err:
        reason = str(err)
    if not train_if_missing:
        raise FileNotFoundError(f"{root}: {reason}")
    return train_extractors(root, frames, size, motion, corpus_size=corpus_size, steps=steps)
