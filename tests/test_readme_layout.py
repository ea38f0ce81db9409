"""The README's layout table matches the tree: every layer folder has a row, every module it
names exists there, and every module of a layer is named in its row."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(ipa_lib/[a-z_]+)/` \| (.+) \|$", section, flags=re.M)}


def test_every_layer_has_a_row_and_every_module_is_named():
    rows = _rows()
    layers = sorted(f"ipa_lib/{p.name}" for p in (ROOT / "ipa_lib").iterdir() if (p / "__init__.py").is_file())
    assert sorted(rows) == layers
    for layer, text in rows.items():
        folder = ROOT / layer
        named = set(re.findall(r"`([a-z_]+)(?:\.py)?`", text))
        modules = {p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "__main__")}
        subpackages = {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
        assert modules <= named, f"{layer}: not in the README row: {sorted(modules - named)}"
        stale = [f for f in re.findall(r"`([a-z_]+\.py)`", text) if not (folder / f).is_file()]
        assert not stale, f"{layer}: the README names files that are not there: {stale}"
        for sub in subpackages:
            assert f"`{sub}/`" in text, f"{layer}/{sub}/ is not in the README row"

