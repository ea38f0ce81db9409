"""Pictures people would rather look at than numbers: side-by-side strips and curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def side_by_side(stem: str | Path, columns: dict[str, np.ndarray], scale: int = 4) -> tuple[Path, Path]:
    """Write `<stem>.png` (rows = clips, frames left to right, one block per column) and
    `<stem>.gif` (the columns side by side, animated over frames). Arrays are (N, F, H, W, 3) uint8."""
    from PIL import Image, ImageDraw

    stem = Path(stem)
    names = list(columns)
    n, f, h, w, _ = columns[names[0]].shape
    gap = 2
    label_h = 12
    block_w = f * w + gap
    sheet = np.full((label_h + n * (h + gap), len(names) * block_w, 3), 255, np.uint8)
    for c, name in enumerate(names):
        for i in range(n):
            row = np.concatenate(list(columns[name][i]), axis=1)
            y = label_h + i * (h + gap)
            sheet[y : y + h, c * block_w : c * block_w + f * w] = row
    img = Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for c, name in enumerate(names):
        draw.text((c * block_w * scale + 4, 2), name, fill=(0, 0, 0))
    png = stem.with_suffix(".png")
    img.save(png)
    frames = []
    for t in range(f):
        grid = np.full((n * (h + gap), len(names) * (w + gap), 3), 255, np.uint8)
        for c, name in enumerate(names):
            for i in range(n):
                grid[i * (h + gap) : i * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = columns[name][i, t]
        frames.append(Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST))
    gif = stem.with_suffix(".gif")
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=250, loop=0)
    return png, gif


def plot_curve(path: str | Path, log: list[dict], keys: tuple[str, ...] = ("loss", "implicit_acc", "gain"), title: str = "") -> Path:
    """Training curves from a log of {"step": ..., key: ...} rows, one panel per key present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = tuple(k for k in keys if any(k in e for e in log)) or ("loss",)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys):
        pts = [(e["step"], e[key]) for e in log if key in e]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
