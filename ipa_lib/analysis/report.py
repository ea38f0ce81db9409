"""The miniature paper table: grid cells -> mean +- interval per method x beta, claims, docs/results.md.

The report is a pure function of the collected cells (`ipa_lib.analysis.cells`, written by
`scripts/paper_grid.py`), so it shows exactly what the cells computed (tests/test_report.py
checks it). The parts, one module each:

- `cells`: the cell folders and their per-clip rows;
- `clip_metrics`: with stored clips, Frechet distances and artefact probes;
- `stats`: intervals (t over training seeds, bootstrap over poses) and the table's rows;
- `claims`: the paper's claims as data (paired differences, verdicts);
- `plots`: beta curves and the clip grid;  `render`: the Markdown.

`write_report` is what `ipa report` runs (`ipa_lib.cli.report` parses its options);
`build_report` does the work once the cells and extractors are in hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ipa_lib.analysis.cells import SET_METRICS, Cell, load_cells
from ipa_lib.analysis.claims import evaluate_claims
from ipa_lib.analysis.clip_metrics import add_clip_metrics
from ipa_lib.analysis.plots import clip_grid, plot_beta_curves
from ipa_lib.analysis.render import describe_setup, render_markdown
from ipa_lib.analysis.stats import aggregate
from ipa_lib.core.io import jsonable


def build_report(cells: Sequence[Cell], out: str | Path, images_dir: str | Path, *, extractors: dict | None,
                 tolerances: dict[str, float] | None = None, level: float = 0.95, n_boot: int = 1000,
                 primary: str = "hand_psnr", command: str = "make paper-table", extra_notes: Sequence[str] = (),
                 grid_records: Sequence[dict] = (), extra_sections: str = "") -> dict:
    """Compute everything from the cells, write the markdown, the PNGs and `<images>/cells.json`; return the numbers."""
    out, images_dir = Path(out), Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    clip_info = add_clip_metrics(cells, extractors)
    rows = aggregate(cells, level, n_boot)
    tolerances = dict(tolerances or {})
    floor = clip_info.get("real_floor", {})
    for m in SET_METRICS:  # an FD change smaller than the distance between two real sets is noise
        if m in floor and m not in tolerances:
            tolerances[m] = float(floor[m])
    claims = evaluate_claims(cells, rows, primary=primary, tolerances=tolerances, level=level, n_boot=n_boot)
    images: dict[int, dict[str, list[str]]] = {}
    for rnd in sorted({c.round for c in cells}):
        curves = plot_beta_curves(rows, images_dir, rnd)
        grid = clip_grid(cells, rows, images_dir, rnd, primary=primary)
        images[rnd] = {"curves": [_relpath(p, out.parent) for p in curves],
                       "grid": [_relpath(grid, out.parent)] if grid else []}
    setup = describe_setup(cells, clip_info, extractors, grid_records)
    notes = list(extra_notes)
    sft_claim = next((c for c in claims if c.round == 1 and c.key == "vs_sft"), None)
    if sft_claim is not None and sft_claim.verdict != "held":
        if any(c.round == 2 for c in cells):
            notes.append("Round 1 did not show IPA better than SFT; round 2 (sampling again from each round-1 model) is reported above.")
        else:
            notes.append("Round 1 did not show IPA better than SFT. A second round (sample again from the aligned "
                         "models) is `python scripts/paper_grid.py run --round 2 --methods ipa-hand sft --betas 600` followed by "
                         "`ipa report`; it was not run here.")
    if not any(c.clips is not None for c in cells):
        notes.append("No cell stored its generated clips (eval/clips.npz), so FD, hand FD, the artefact probes and the clip grid are missing.")
    text = render_markdown(rows, claims, setup=setup, images=images, notes=notes, level=level, command=command)
    if extra_sections:
        text = text.rstrip("\n") + "\n\n" + extra_sections.rstrip("\n") + "\n"
    from ipa_lib.core.io import atomic_write_json, atomic_write_text

    atomic_write_text(out, text)
    numbers = {
        "rows": [{"round": r.round, "method": r.method, "beta": r.beta, "hand_weight": r.hand_weight, "seeds": r.seeds,
                  "seconds": r.seconds, "train_seconds": r.train_seconds, "start_of": r.start_of, "stats": {m: s.__dict__ for m, s in r.stats.items()},
                  "per_seed": {m: {str(k): v for k, v in d.items()} for m, d in r.per_seed.items()}} for r in rows],
        "claims": [c.record() for c in claims],
        "cells": [{"name": c.name, "round": c.round, "method": c.method, "loss": c.loss, "beta": c.beta,
                   "hand_weight": c.hand_weight, "seed": c.seed, "meta": c.meta, "set_metrics": c.set_metrics, "rows": c.rows}
                  for c in cells],
        **clip_info,
    }
    atomic_write_json(images_dir / "cells.json", jsonable(numbers))
    return {"rows": rows, "claims": claims, "markdown": text, "images": images, **clip_info}


def load_extractor(spec: str) -> dict:
    """`MODULE:CALLABLE` (any clips (N,F,H,W,3) uint8 -> (N,D) features) as the FD and hand-FD extractor."""
    import importlib

    from ipa_lib.core.errors import InputError

    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise InputError(f"--extractor {spec!r}: cannot import it ({err})") from None
    return {"fd": fn, "hand_fd": fn}  # hand views are clips too


def write_report(cells_dir: str | Path, out: str | Path = "docs/results.md", *, images: str | Path | None = None,
                 params: str | Path = "params.yaml", overrides: Sequence[str] = (), features: str | Path = "models/features",
                 extractor: str | None = None, fd: bool = True, level: float = 0.95, n_boot: int = 1000,
                 primary: str = "hand_psnr", command: str = "make paper-table",
                 experiments: str | Path | None = None) -> dict:
    """`ipa report`: read the collected cells under `cells_dir`, compute, write `out` and its images
    (default folder: `out` without `.md`). FD uses `extractor` (MODULE:CALLABLE) when given, else the
    toy extractors under `features` (trained there if missing), or is skipped with `fd=False`.
    `experiments`: a folder of collected experiment cells (`scripts/experiments.py`) whose sections
    and verdicts are appended (`ipa_lib.analysis.experiments`; numbers in `<images>/experiments.json`).
    Returns `build_report`'s numbers plus the paths written (`out`, `images_dir`) and `predictions`."""
    import json

    from ipa_lib.core.config import load_params

    p = load_params(params, list(overrides))
    cells = load_cells(cells_dir)
    out = Path(out)
    images_dir = Path(images) if images else out.with_suffix("")
    extractors = None
    if fd and extractor:
        extractors = load_extractor(extractor)
    elif fd and any(c.clips is not None for c in cells):
        from ipa_lib.analysis.features import load_extractors

        toy = next(c for c in cells if c.clips is not None).params.get("toy", {})
        ex = load_extractors(features, int(toy.get("frames", p.toy.frames)), int(toy.get("size", p.toy.size)),
                             float(toy.get("motion", p.toy.motion)))
        extractors = {"fd": ex["full"], "hand_fd": ex["hands"]}
    records = [json.loads(f.read_text()) for f in sorted(Path(cells_dir).glob("grid-round-*.json"))]
    sections, preds = "", []
    if experiments is not None and Path(experiments).is_dir():
        from ipa_lib.analysis.experiments import experiments_report

        sections, preds = experiments_report(experiments, images_dir, out.parent, images_dir / "experiments.json", level, n_boot)
    result = build_report(cells, out, images_dir, extractors=extractors, tolerances=dict(p.promote.tolerances),
                          level=level, n_boot=n_boot, primary=primary, command=command, grid_records=records,
                          extra_sections=sections)
    return {**result, "out": out, "images_dir": images_dir, "predictions": preds}


def _relpath(p: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(p).resolve(), Path(start).resolve())
