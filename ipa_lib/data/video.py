"""Video and image I/O with bounded memory and errors that name the file and the problem.

Frames are always RGB uint8 (H, W, 3): grayscale is expanded to three channels, RGBA and
palette images lose alpha. Videos are decoded by the ffmpeg binary that ships with
`imageio-ffmpeg`, streamed as self-describing PPM frames through a pipe, one frame in
memory at a time; stills (and animated GIF/APNG/TIFF) are read with Pillow.

Decoding is strict: ffmpeg's error-level log lines (a truncated file, a damaged packet)
make the read fail with `VideoError` after the good frames, so "decodable" means every
frame decoded cleanly, which is what a training sample needs.

`probe` reads frame count, size and fps from the container header (PyAV) and decodes only
when the header lacks them; `iter_windows` reads a long video in windows of N frames.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ipa_lib.core.errors import InputError

# Refuse frames above this many pixels before allocating them (a 100000x100000 PNG header
# costs nothing to write and 30 GB to decode). 8192x8192 covers every 8K source.
DEFAULT_MAX_PIXELS = 8192 * 8192
# read_video holds all frames at once: refuse clips above this many bytes (2 GiB)
DEFAULT_MAX_BYTES = 2 << 30


class VideoError(InputError):
    """A file that cannot be used as a video or image; `path` and `problem` are kept for reports."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise VideoError(p, "no such file")
    if p.is_dir():
        raise VideoError(p, "is a directory, not a video")
    if not os.access(p, os.R_OK):
        raise VideoError(p, "permission denied (not readable)")
    if p.stat().st_size == 0:
        raise VideoError(p, "empty file (0 bytes)")
    return p


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W) / (H, W, 1|2|3|4) any int/float dtype -> (H, W, 3) uint8."""
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.size and arr.max() > 255):
        arr = (arr.astype(np.float32) / (65535.0 if arr.max() > 255 else 255.0) * 255.0).round()
    if arr.dtype.kind == "f":
        arr = np.clip(arr, 0, 255)
    arr = arr.astype(np.uint8, copy=False)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    if c in (1, 2):  # gray, gray+alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif c == 4:  # RGBA: alpha dropped (a mask is not part of the picture the model sees)
        arr = arr[:, :, :3]
    elif c != 3:
        raise ValueError(f"cannot make RGB from a frame of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _open_image(p: Path):
    """A Pillow image when the file is one Pillow reads, else None (then ffmpeg gets it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(p)
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError as err:
        raise VideoError(p, f"image too large to decode safely: {err}") from None
    except OSError as err:
        raise VideoError(p, f"cannot read image: {err}") from None


def _iter_image(p: Path, im, max_pixels: int) -> Iterator[np.ndarray]:
    from PIL import ImageSequence

    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise VideoError(p, f"resolution {w}x{h} exceeds the limit of {max_pixels} pixels per frame")
        try:
            for frame in ImageSequence.Iterator(im):
                if frame.mode == "P" or frame.mode == "PA":
                    frame = frame.convert("RGBA")
                elif frame.mode == "CMYK" or frame.mode == "YCbCr" or frame.mode == "LAB":
                    frame = frame.convert("RGB")
                yield _to_rgb(np.asarray(frame))
        except (OSError, SyntaxError, ValueError) as err:  # truncated / damaged image data
            raise VideoError(p, f"damaged image data: {err}") from None


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


_CTX = re.compile(r"^(\[[^\]]*@ 0x[0-9a-f]+\]\s*)+")


def _log_problems(log: str) -> list[str]:
    """Error/fatal lines of an ffmpeg `-loglevel level+...` log, without the `[ctx @ 0x..]` noise."""
    out = []
    for line in log.splitlines():
        if "[error]" in line or "[fatal]" in line:
            msg = _CTX.sub("", line).replace("[error]", "").replace("[fatal]", "").strip()
            if msg and msg not in out:
                out.append(msg)
    return out


def _summarise(problems: list[str]) -> str:
    """The informative part of ffmpeg's complaints, shortest first-cause wording."""
    if not problems:
        return "ffmpeg failed without a message"
    if any("matches no streams" in m for m in problems):
        return "no video stream in the file"
    # "Error opening input file X." / "Error opening input files: Y" repeat the cause
    specific = [m.removeprefix("Error opening input: ") for m in problems
                if not m.startswith("Error opening input file")]  # fmt: skip
    specific = list(dict.fromkeys(specific or problems))
    shown = specific[:2] + ([specific[-1]] if len(specific) > 2 else [])
    return "; ".join(shown)


def _read_exact(stream, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            return None
        got += k
    return buf


def _iter_ffmpeg(p: Path, max_pixels: int, strict: bool) -> Iterator[np.ndarray]:
    # PPM frames carry their own size, so no separate probe is needed and a mid-stream
    # resolution change cannot desynchronise the pipe
    cmd = [_ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "level+error", "-i", str(p),
           "-map", "0:v:0", "-f", "image2pipe", "-vcodec", "ppm", "-pix_fmt", "rgb24", "-"]  # fmt: skip
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty stderr cannot deadlock
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        count, finished = 0, False
        try:
            while True:
                magic = proc.stdout.readline()
                if not magic:
                    break
                dims = proc.stdout.readline().split()
                proc.stdout.readline()  # maxval (255 for rgb24)
                if magic.strip() != b"P6" or len(dims) != 2:
                    raise VideoError(p, "unexpected data from the decoder")
                w, h = int(dims[0]), int(dims[1])
                if w * h > max_pixels:
                    raise VideoError(p, f"resolution {w}x{h} exceeds the limit of {max_pixels} pixels per frame")
                buf = _read_exact(proc.stdout, w * h * 3)
                if buf is None:
                    break
                count += 1
                yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
            finished = True
        finally:
            if not finished and proc.poll() is None:
                proc.kill()  # consumer stopped early or we raised: no need for the rest
            proc.stdout.close()
            rc = proc.wait()
        log.seek(0)
        problems = _log_problems(log.read().decode("utf-8", "replace"))
    if count == 0:
        raise VideoError(p, f"not a decodable video or image ({_summarise(problems)})")
    if strict and (rc != 0 or problems):
        raise VideoError(p, f"corrupt or truncated: decoded {count} frame(s), then {_summarise(problems)}")


def iter_frames(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = True
) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames (H, W, 3) one at a time; VideoError names the file and the problem.

    A still image yields one frame. `strict=False` keeps the frames of a damaged video
    that ffmpeg could decode instead of raising at the end.
    """
    p = _check_file(path)
    im = _open_image(p)
    if im is not None:
        yield from _iter_image(p, im, max_pixels)
    else:
        yield from _iter_ffmpeg(p, max_pixels, strict)


def is_image(path: str | os.PathLike) -> bool:
    """True when Pillow identifies the file as a (possibly animated) image."""
    im = _open_image(_check_file(path))
    if im is None:
        return False
    im.close()
    return True


def read_video(
    path: str | os.PathLike, max_frames: int | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """All (or the first `max_frames`) frames as (F, H, W, 3) uint8; bounded by `max_bytes`."""
    frames: list[np.ndarray] = []
    total = 0
    gen = iter_frames(path)
    try:
        for frame in gen:
            if frames and frame.shape != frames[0].shape:
                raise VideoError(path, f"frame size changes mid-video ({frames[0].shape} -> {frame.shape})")
            total += frame.nbytes
            if total > max_bytes:
                raise VideoError(path, f"more than {max_bytes} bytes of frames; read it with iter_frames or max_frames")
            frames.append(frame)
            if max_frames is not None and len(frames) >= max_frames:
                break
    finally:
        gen.close()  # stops ffmpeg when we broke out early
    return np.stack(frames)


def iter_windows(path: str | os.PathLike, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 strict: bool = True) -> Iterator[np.ndarray]:  # fmt: skip
    """Yield the video in windows of `size` frames, (n, H, W, 3) uint8 with n = size except
    possibly the last: a long video in bounded memory (one window plus one frame)."""
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    window: list[np.ndarray] = []
    gen = iter_frames(path, max_pixels=max_pixels, strict=strict)
    try:
        for frame in gen:
            if window and frame.shape != window[0].shape:
                raise VideoError(path, f"frame size changes mid-video ({window[0].shape} -> {frame.shape})")
            window.append(frame)
            if len(window) == size:
                yield np.stack(window)
                window = []
    finally:
        gen.close()  # stops ffmpeg when the consumer stops early
    if window:
        yield np.stack(window)


def _header(p: Path) -> dict | None:
    """{frames, height, width, fps} of the first video stream from the container header
    (PyAV; nothing decoded). A field the header lacks is 0 (Matroska/WebM store no frame
    count); None when PyAV cannot open the file or it has no video stream."""
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                return None
            s = container.streams.video[0]
            rate = s.average_rate or s.base_rate or s.guessed_rate
            return {"frames": int(s.frames or 0), "height": int(s.codec_context.height or 0),
                    "width": int(s.codec_context.width or 0), "fps": float(rate) if rate else 0.0}  # fmt: skip
    except (av.FFmpegError, OSError, ValueError, IndexError):
        return None


def header_fps(path: str | os.PathLike) -> float:
    """Nominal frame rate from the stream header (0.0 when it has none)."""
    head = _header(Path(path))
    return head["fps"] if head else 0.0


def probe(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = False) -> dict:
    """{frames, height, width, fps, kind, frames_from} of a video or image.

    Videos: frame count, size and fps from the container header (`frames_from` "header");
    frames are decoded and counted only when the header lacks the count or the size, when
    PyAV cannot read the header (the decoder then names the problem), or with `decode=True`
    (`frames_from` "decode"). Only a decode proves decodability: a truncated file keeps
    its header's count until decoded. `kind` "image": stills and animations Pillow reads
    (always decoded, fps 0.0).
    """
    p = _check_file(path)
    kind = "image" if is_image(p) else "video"
    head = _header(p) if kind == "video" else None
    if head is not None and head["width"] * head["height"] > max_pixels:
        raise VideoError(p, f"resolution {head['width']}x{head['height']} exceeds the limit of {max_pixels} pixels per frame")
    if head is not None and head["frames"] > 0 and head["width"] > 0 and not decode:
        return {**head, "kind": kind, "frames_from": "header"}
    frames, shape = 0, None
    for frame in iter_frames(p, max_pixels=max_pixels):
        if shape is not None and frame.shape != shape:
            raise VideoError(p, f"frame size changes mid-video ({shape} -> {frame.shape})")
        shape = frame.shape
        frames += 1
    fps = 0.0 if kind == "image" else (head["fps"] if head else 0.0)
    return {"frames": frames, "height": int(shape[0]), "width": int(shape[1]), "fps": fps, "kind": kind,
            "frames_from": "decode"}  # fmt: skip


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray] | np.ndarray, fps: float, *,
                quality: float = 8.0, codec: str | None = None) -> Path:  # fmt: skip
    """Encode RGB frames (F, H, W, 3) uint8 (or (H, W) gray / RGBA) to `path`, atomically.

    Written to a temporary file in the same folder and renamed, so readers never see a
    half-written video. Odd sizes are kept exactly (yuv444p instead of yuv420p).
    """
    import imageio_ffmpeg

    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ffmpeg creates the temp file itself (normal permissions); the suffix picks the container
    tmp = str(path.parent / f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix or '.mp4'}")
    writer, size, n = None, None, 0
    try:
        for frame in frames:
            rgb = _to_rgb(np.asarray(frame))
            if size is None:
                size = rgb.shape[:2]
                pix_fmt = "yuv420p" if size[0] % 2 == 0 and size[1] % 2 == 0 else "yuv444p"
                writer = imageio_ffmpeg.write_frames(tmp, (size[1], size[0]), fps=fps, quality=quality, codec=codec,
                                                     pix_fmt_out=pix_fmt, macro_block_size=1,
                                                     output_params=["-y"])  # fmt: skip
                writer.send(None)
            elif rgb.shape[:2] != size:
                raise ValueError(f"frame {n} has size {rgb.shape[:2]}, expected {size}")
            writer.send(rgb.tobytes())
            n += 1
        if writer is None:
            raise ValueError(f"{path}: no frames to write")
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
