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
