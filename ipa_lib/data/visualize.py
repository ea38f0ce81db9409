"""Pictures people would rather look at than numbers: side-by-side strips and curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABEL_MIN_PX = 14  # label text height at the least
LABEL_WIDTH_FRACTION = 1 / 60  # ... and this fraction of the sheet's width, so it stays readable shrunk to a page


def side_by_side(stem: str | Path, columns: dict[str, np.ndarray], scale: int = 4) -> tuple[Path, Path]:
    """Write `<stem>.png` (rows = clips, frames left to right, one block per column) and
    `<stem>.gif` (the columns side by side, animated over frames). Arrays are (N, F, H, W, 3) uint8.

    The PNG's column labels are drawn at full resolution, `LABEL_WIDTH_FRACTION` of the sheet's
    width tall (at least `LABEL_MIN_PX`, at most what fits the column), so a README showing the
    sheet at page width still shows them at a readable size."""
    from PIL import Image

    stem = Path(stem)
    names = list(columns)
    n, f, h, w, _ = columns[names[0]].shape
    gap = 2
    block_w = f * w + gap
    sheet = np.full((n * (h + gap), len(names) * block_w, 3), 255, np.uint8)
    for c, name in enumerate(names):
        for i in range(n):
            row = np.concatenate(list(columns[name][i]), axis=1)
            y = i * (h + gap)
            sheet[y : y + h, c * block_w : c * block_w + f * w] = row
    strips = Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST)
    band = _label_band(names, block_w * scale, strips.width)
    img = Image.new("RGB", (strips.width, band.height + strips.height), (255, 255, 255))
    img.paste(band, (0, 0))
    img.paste(strips, (0, band.height))
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


def _label_band(names: list[str], block_px: int, width: int):
    """A white band with each name left-aligned over its block of `block_px` pixels."""
    from PIL import Image, ImageDraw, ImageFont

    size = max(LABEL_MIN_PX, round(width * LABEL_WIDTH_FRACTION))
    font = ImageFont.load_default(size=size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while size > LABEL_MIN_PX and max(probe.textlength(name, font=font) for name in names) > block_px - size:
        size -= 1  # the longest name must fit its block
        font = ImageFont.load_default(size=size)
    pad = max(2, size // 3)
    band = Image.new("RGB", (width, size + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for c, name in enumerate(names):
        draw.text((c * block_px + pad, pad), name, fill=(0, 0, 0), font=font)
    return band


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
