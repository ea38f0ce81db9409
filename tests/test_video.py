"""Video I/O: real decoding, header probing (PyAV), windows, atomic writes, and every kind of bad input named clearly."""

from __future__ import annotations

import os
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hands_fixtures import encode, real_dir

from ipa_lib.data import video
from ipa_lib.data.video import VideoError, header_fps, iter_frames, iter_windows, probe, read_video, write_video


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG that claims a huge size (what a decompression bomb looks like to a reader)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def real_video() -> Path:
    return real_dir() / "video.avi"


def test_real_video_probe_and_read(real_video):
    info = probe(real_video)
    assert info == {"frames": 205, "height": 720, "width": 1280, "fps": 50.0, "kind": "video", "frames_from": "header"}
    assert probe(real_video, decode=True) == {**info, "frames_from": "decode"}  # the header's count is the decoded one
    assert header_fps(real_video) == 50.0
    clip = read_video(real_video, max_frames=5)
    assert clip.shape == (5, 720, 1280, 3) and clip.dtype == np.uint8 and clip.std() > 10
    first = next(iter_frames(real_video))
    np.testing.assert_array_equal(first, clip[0])


@pytest.mark.parametrize("size", [(32, 48), (33, 47)])
def test_write_read_roundtrip_atomic(tmp_path, size):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([(xx * 5 + 10 * i) % 256, yy * 7 % 256, np.full_like(xx, 128)], -1)
                       for i in range(9)]).astype(np.uint8)  # fmt: skip
    out = write_video(tmp_path / "clip.mp4", frames, fps=16)
    assert out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temp left
    assert probe(out) == {"frames": 9, "height": h, "width": w, "fps": 16.0, "kind": "video", "frames_from": "header"}
    back = read_video(out)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 4  # lossy but close


def test_failed_write_leaves_nothing(tmp_path):
    frames = [np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame 1 has size"):
        write_video(tmp_path / "bad.mp4", frames, fps=8)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "bad.mp4", np.zeros((1, 8, 8, 3), np.uint8), fps=0)
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "bad.mp4", [], fps=8)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- bad inputs


def test_corrupt_header(tmp_path, real_video):
    data = bytearray(real_video.read_bytes())
    data[:4096] = os.urandom(4096)
    (tmp_path / "corrupt.avi").write_bytes(bytes(data))
    with pytest.raises(VideoError, match="corrupt.avi: not a decodable video") as err:
        probe(tmp_path / "corrupt.avi")
    assert err.value.path.endswith("corrupt.avi") and "Invalid data" in err.value.problem


def test_truncated(tmp_path, real_video):
    data = real_video.read_bytes()
    path = tmp_path / "truncated.avi"
    path.write_bytes(data[: len(data) // 2])
    # the AVI header survives the cut: probe reports its count without decoding, decode=True finds the damage
    assert probe(path) == {"frames": 205, "height": 720, "width": 1280, "fps": 50.0, "kind": "video", "frames_from": "header"}
    with pytest.raises(VideoError, match=r"truncated.avi: corrupt or truncated: decoded \d+ frame"):
        probe(path, decode=True)
    with pytest.raises(VideoError, match=r"truncated.avi: corrupt or truncated"):
        sum(len(w) for w in iter_windows(path, 64))
    # the frames before the damage can still be had on request
    partial = sum(1 for _ in iter_frames(path, strict=False))
    assert 50 < partial < 205


def test_truncated_mp4_without_index(tmp_path):
    clip = write_video(tmp_path / "whole.mp4", np.full((6, 16, 16, 3), 90, np.uint8), fps=8)
    data = clip.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="cut.mp4: not a decodable video"):
        read_video(tmp_path / "cut.mp4")
    with pytest.raises(VideoError, match="cut.mp4: not a decodable video"):
        probe(tmp_path / "cut.mp4")  # no header to read: the decoder names the problem


@pytest.mark.parametrize("name, codec, from_header", [("h.mp4", None, True), ("m.avi", "mjpeg", True),
                                                      ("n.mkv", "libx264", False), ("v.webm", "libvpx-vp9", False)])
def test_probe_reads_the_header_and_decodes_only_without_a_count(tmp_path, name, codec, from_header):
    frames = np.random.default_rng(0).integers(0, 256, (7, 24, 32, 3), dtype=np.uint8)
    path = write_video(tmp_path / name, frames, fps=12, codec=codec)
    info = probe(path)
    # MP4 and AVI store the frame count; Matroska/WebM do not, so those are counted by decoding
    assert info == {"frames": 7, "height": 24, "width": 32, "fps": 12.0, "kind": "video",
                    "frames_from": "header" if from_header else "decode"}
    assert probe(path, decode=True) == {**info, "frames_from": "decode"}


def test_truncated_file_without_a_header_count_is_decoded_and_refused(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (30, 48, 64, 3), dtype=np.uint8)
    data = write_video(tmp_path / "whole.mkv", frames, fps=10, codec="libx264").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(VideoError, match=r"cut.mkv: corrupt or truncated: decoded \d+ frame"):
        probe(tmp_path / "cut.mkv")


def test_long_video_in_windows(real_video, tmp_path):
    sizes = [w.shape for w in iter_windows(real_video, 64)]
    assert sizes == [(64, 720, 1280, 3)] * 3 + [(13, 720, 1280, 3)]
    frames = (np.arange(10)[:, None, None, None] * 20 + np.zeros((10, 16, 16, 3))).astype(np.uint8)
    path = encode(tmp_path / "lossless.mkv", frames, "rgb24", "ffv1")
    windows = list(iter_windows(path, 4))
    assert [len(w) for w in windows] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(windows), frames)  # every frame once, in order
    with pytest.raises(ValueError, match="window size"):
        next(iter_windows(path, 0))
    with pytest.raises(VideoError, match="missing.mp4: no such file"):
        next(iter_windows(tmp_path / "missing.mp4", 4))


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("notes.mp4", b"just some text\n" * 20, "not a decodable video or image"),
        ("empty.mp4", b"", "empty file (0 bytes)"),
    ],
)
def test_non_video_and_empty(tmp_path, name, content, problem):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(VideoError, match=re.escape(f"{name}: {problem}")):
        read_video(tmp_path / name)


def test_unreadable_paths(tmp_path, monkeypatch):
    with pytest.raises(VideoError, match="no such file"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="is a directory"):
        probe(tmp_path)
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    with pytest.raises(VideoError, match="dangling.mp4: no such file"):
        probe(tmp_path / "dangling.mp4")
    # root can read anything, so simulate a permission problem at the access check
    f = tmp_path / "locked.mp4"
    f.write_bytes(b"x" * 10)
    monkeypatch.setattr(video.os, "access", lambda p, mode: False)
    with pytest.raises(VideoError, match="locked.mp4: permission denied"):
        probe(f)


def test_single_frame_video(tmp_path):
    path = write_video(tmp_path / "one.mp4", np.full((1, 24, 32, 3), 200, np.uint8), fps=8)
    assert probe(path)["frames"] == 1 and probe(path, decode=True)["frames"] == 1
    assert read_video(path).shape == (1, 24, 32, 3)


def test_grayscale_and_rgba_videos(tmp_path):
    gray = (np.arange(3 * 24 * 32) % 256).astype(np.uint8).reshape(3, 24, 32)
    v = read_video(encode(tmp_path / "gray.mkv", gray, "gray", "ffv1"))
    assert v.shape == (3, 24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(v[..., c], gray)  # lossless codec: exact
    rgba = np.random.default_rng(0).integers(0, 256, (3, 24, 32, 4), dtype=np.uint8)
    v = read_video(encode(tmp_path / "rgba.mov", rgba, "rgba", "png"))
    np.testing.assert_array_equal(v, rgba[..., :3])  # alpha dropped, colour kept


def test_grayscale_and_rgba_images(tmp_path):
    from PIL import Image

    g = (np.arange(20 * 30) % 256).astype(np.uint8).reshape(20, 30)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    rgba = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert probe(tmp_path / "g.png") == {"frames": 1, "height": 20, "width": 30, "fps": 0.0, "kind": "image",
                                         "frames_from": "decode"}  # fmt: skip
    np.testing.assert_array_equal(read_video(tmp_path / "g.png")[0], np.repeat(g[:, :, None], 3, 2))
    np.testing.assert_array_equal(read_video(tmp_path / "a.png")[0], rgba[..., :3])


def test_huge_resolution_bounded(tmp_path):
    # a 4K clip decodes one frame at a time: peak memory ~2 frames, not the clip
    big = np.zeros((4, 2160, 3840, 3), np.uint8)
    big[:, ::7] = 200
    path = write_video(tmp_path / "uhd.mp4", big, fps=10)
    del big
    frame_bytes = 2160 * 3840 * 3
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_frames(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 4 and peak < 2.5 * frame_bytes
    # and a limit refuses it before allocating a frame
    with pytest.raises(VideoError, match="resolution 3840x2160 exceeds the limit"):
        next(iter_frames(path, max_pixels=1920 * 1080))
    with pytest.raises(VideoError, match="uhd.mp4: resolution 3840x2160 exceeds the limit"):
        probe(path, max_pixels=1920 * 1080)  # from the header, nothing decoded
    with pytest.raises(VideoError, match="more than 1000000 bytes"):
        read_video(path, max_bytes=1_000_000)
    # a tiny file claiming a huge picture is refused from its header
    with pytest.raises(VideoError, match="9000x9000 exceeds"):
        probe(png_header_only(tmp_path / "huge.png", 9000, 9000))
    with pytest.raises(VideoError, match="too large"):
        probe(png_header_only(tmp_path / "bomb.png", 100_000, 100_000))
