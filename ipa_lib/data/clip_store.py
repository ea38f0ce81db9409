"""The clip store the sample stage writes and the gate reads: compressed npz shards plus
`manifest.jsonl`, one row per clip (`sample_id`, `video` = "<shard>#<index>", pose id, seed, size)."""

from __future__ import annotations

import json
from pathlib import Path

from ipa_lib.core.errors import InputError

SHARD = "shard-000.npz"
MANIFEST = "manifest.jsonl"


def write_manifest(folder: Path, rows: list[dict]) -> None:
    (folder / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_manifest(folder: str | Path) -> list[dict]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: sample manifest not found (run the sample stage first)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{n}: not valid JSON ({err})") from None
    return rows


# ---- the case clip store (data.cases) --------------------------------------------------
# <store>/shard-NNN.npz   one array per clip, keyed by sample_id: video (F, H, W, 3) uint8; a shard
#                         is read lazily (one clip in memory at a time), so shards of long clips work
# <store>/cases/<id>.npz  the case's conditioning at clip size (ipa_lib.data.cases.load_case), once
#                         per case, however many clips it has
# <store>/manifest.jsonl  one row per clip: sample_id, video ("<shard>#<sample_id>"), case_id, pose_id
#                         (= case_id: clips of a case share their driving pose), seed, shard, sizes,
#                         and the conditioning's source paths
CASES_DIR = "cases"
CONDITIONS = ("face", "background", "replace_mask")  # what a case adds to reference + pose


def shard_name(index: int) -> str:
    return f"shard-{index:03d}.npz"


def shard_of(position: int, total: int, shards: int) -> int:
    """Contiguous shards: clip `position` of `total` goes to shard position * shards // total."""
    return position * min(shards, total) // total


def save_conditions(store: str | Path, case_id: str, arrays: dict) -> Path:
    from ipa_lib.core.io import save_npz

    return save_npz(Path(store) / CASES_DIR / f"{case_id}.npz", **arrays)


class ClipStore:
    """Read a case clip store: clips by manifest row (lazily, per shard) and per-case conditioning (cached)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._shards: dict[str, object] = {}
        self._conditions: dict[str, dict] = {}

    def clip(self, row: dict):
        """The clip of a manifest row, (F, H, W, 3) uint8; ValueError names the shard when it is damaged."""
        import numpy as np

        name, _, key = str(row["video"]).partition("#")
        path = self.folder / name
        try:
            if name not in self._shards:
                self._shards[name] = np.load(path)
            return self._shards[name][key]
        except KeyError:
            raise ValueError(f"{path}: no clip {key!r}") from None
        except FileNotFoundError:
            raise ValueError(f"{path}: shard not found") from None
        except Exception as err:  # zipfile.BadZipFile, EOFError, ValueError...
            raise ValueError(f"{path}: corrupt or truncated shard ({type(err).__name__}: {err})") from None

    def conditions(self, case_id: str) -> dict:
        if case_id not in self._conditions:
            from ipa_lib.core.io import load_npz

            self._conditions[case_id] = load_npz(self.folder / CASES_DIR / f"{case_id}.npz")
        return self._conditions[case_id]

    def close(self) -> None:
        for z in self._shards.values():
            z.close()
        self._shards.clear()

    def __enter__(self) -> "ClipStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_shard_infos(shard_dirs, info_name: str, what: str) -> dict:
    """shard index -> (folder, its `info_name` JSON) of shard folders (sampled or evaluation
    shards); a folder without the file, or a shard given twice, is an InputError naming it."""
    from ipa_lib.core.io import read_json

    found: dict = {}
    for folder in map(Path, shard_dirs):
        if not (folder / info_name).is_file():
            raise InputError(f"{folder}: not {'an' if what[0] in 'aeiou' else 'a'} {what} ({info_name} missing)")
        info = read_json(folder / info_name, f"{what} info")
        s = info.get("shard")
        if s in found:
            raise InputError(f"{what.replace('sampled ', '')} {s} given twice: {found[s][0]} and {folder}")
        found[s] = (folder, info)
    return found
