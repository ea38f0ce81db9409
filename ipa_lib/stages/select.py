"""Pick the best run of a beta sweep (the pipeline's select-best step).

The rule itself is `ipa_lib.core.decisions.select_best` (the best `primary` metric by its
registry direction; ties go to the earliest run; runs whose primary number is missing or
not finite cannot win). `select_from_runs` applies it to the
folders a sweep wrote (one evaluation folder and one adapter folder per beta) and copies
the winner's folders out. Candidates are ordered by beta before selecting, so the result
does not depend on the order in which a ParallelFor hands its outputs over.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from ipa_lib.core.decisions import finite_number as _number, select_best

EVAL_FILE = "eval.json"  # {"base": {...}, "ipa": {...}} inside an evaluation folder
DETAILS_FILE = "details.json"  # written by the evaluate stage; carries "beta"
TRAIN_SUMMARY = "train_summary.json"  # written by the train stage; carries "beta"


def _read(path: Path, what: str) -> dict:
    from ipa_lib.core.io import read_json

    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _beta(data: dict, path: Path) -> float:
    beta = _number(data.get("beta"))
    if beta is None:
        raise ValueError(f"{path}: no numeric 'beta' (got {data.get('beta')!r})")
    return beta


def select_from_runs(
    eval_dirs: Sequence[str | Path],
    adapter_dirs: Sequence[str | Path],
    primary: str,
    out_adapter: str | Path,
    out_eval: str | Path,
    eval_file: str = EVAL_FILE,
) -> dict:
    """Choose the best (adapter, evaluation) pair of a sweep and copy both out.

    eval_dirs: evaluation folders (`eval_file` + `details.json` with the run's beta; `eval_file` is
    `eval.json`, or `eval_val.json` on cases, where selection uses the val split);
    adapter_dirs: adapter folders (`train_summary.json` with the beta they were trained
    with). Pairs are matched by beta, not by list position. Returns {"index", "beta",
    "primary_metric", "value", "metrics", "candidates"} where candidates are sorted by beta
    and index points into them.
    """
    if len(eval_dirs) != len(adapter_dirs):
        raise ValueError(f"select-best: {len(eval_dirs)} evaluations but {len(adapter_dirs)} adapters")
    adapters: dict[float, Path] = {}
    for d in map(Path, adapter_dirs):
        beta = _beta(_read(d / TRAIN_SUMMARY, "train summary"), d / TRAIN_SUMMARY)
        if beta in adapters:
            raise ValueError(f"select-best: two adapters trained with beta={beta} ({adapters[beta]}, {d})")
        adapters[beta] = d
    candidates = []
    for d in map(Path, eval_dirs):
        beta = _beta(_read(d / DETAILS_FILE, "evaluation details"), d / DETAILS_FILE)
        result = _read(d / eval_file, "evaluation metrics")
        if not isinstance(result.get("ipa"), dict) or not isinstance(result.get("base"), dict):
            raise ValueError(f'{d / eval_file}: expected {{"base": {{...}}, "ipa": {{...}}}}, got keys {sorted(result)}')
        if beta not in adapters:
            raise ValueError(f"select-best: evaluation {d} has beta={beta} but no adapter was trained with it (have {sorted(adapters)})")
        candidates.append({"beta": beta, "ipa": result["ipa"], "base": result["base"], "eval_dir": d, "adapter_dir": adapters[beta]})
    candidates.sort(key=lambda c: c["beta"])
    index = select_best([c["ipa"] for c in candidates], primary)
    best = candidates[index]
    for src, dst in ((best["adapter_dir"], Path(out_adapter)), (best["eval_dir"], Path(out_eval))):
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    return {
        "index": index,
        "beta": best["beta"],
        "primary_metric": primary,
        "value": float(best["ipa"][primary]),
        "metrics": {"base": best["base"], "ipa": best["ipa"]},
        "candidates": [{"beta": c["beta"], "ipa": c["ipa"], "base": c["base"]} for c in candidates],
    }


def eval_metric_items(result: Mapping[str, Mapping[str, object]]) -> dict[str, float]:
    """`{"base": {...}, "ipa": {...}}` -> `eval/<k>` (the aligned model) and `eval/base/<k>`,
    the keys `registry.register_model` logs; non-numbers are dropped."""
    out: dict[str, float] = {}
    for model, prefix in (("ipa", "eval/"), ("base", "eval/base/")):
        for k, v in (result.get(model) or {}).items():
            if (x := _number(v)) is not None:
                out[f"{prefix}{k}"] = x
    return out


def selection_markdown(selection: Mapping) -> str:
    """The select-best decision as a Markdown table for the KFP UI."""
    pm = selection["primary_metric"]
    keys = list(selection["candidates"][0]["ipa"]) if selection["candidates"] else [pm]
    lines = [
        f"## Best beta: {selection['beta']:g} ({pm} = {selection['value']:.4f})",
        "",
        "| beta | " + " | ".join(keys) + " |",
        "| --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for i, c in enumerate(selection["candidates"]):
        mark = " **(best)**" if i == selection["index"] else ""
        cells = [f"{c['ipa'][k]:.4f}" if _number(c["ipa"].get(k)) is not None else str(c["ipa"].get(k)) for k in keys]
        lines.append(f"| {c['beta']:g}{mark} | " + " | ".join(cells) + " |")
    base = selection["metrics"]["base"]
    lines.append("| base model | " + " | ".join(f"{base[k]:.4f}" if _number(base.get(k)) is not None else "" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def evaluation_html(result: Mapping, image: str | Path | None, title: str = "Evaluation") -> str:
    """Base vs aligned metrics and the side-by-side strip (embedded as base64 PNG), as one
    self-contained HTML page for the KFP UI."""
    import base64
    import html

    rows = []
    for k in result["ipa"]:
        b, a = _number(result["base"].get(k)), _number(result["ipa"].get(k))
        delta = f"{a - b:+.4f}" if a is not None and b is not None else ""
        rows.append(f"<tr><td>{html.escape(k)}</td><td>{b if b is None else f'{b:.4f}'}</td>"
                    f"<td>{a if a is None else f'{a:.4f}'}</td><td>{delta}</td></tr>")
    img = ""
    if image is not None and Path(image).is_file():
        data = base64.b64encode(Path(image).read_bytes()).decode("ascii")
        img = f'<h3>Held-out poses: driving pose | base | IPA | ground truth</h3>\n<img alt="side by side" src="data:image/png;base64,{data}">'
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "img{image-rendering:pixelated;max-width:100%}</style></head><body>\n"
        f"<h2>{html.escape(title)}</h2>\n<table><tr><th>metric</th><th>base</th><th>IPA</th><th>delta</th></tr>\n"
        + "\n".join(rows) + "\n</table>\n" + img + "\n</body></html>\n"
    )


def decision_markdown(decision) -> str:
    """A registry promotion decision (`registry.Decision`) as Markdown for the KFP UI."""
    from ipa_lib.core.decisions import format_decision

    return f"## Promotion: {decision.action}\n\n```\n{format_decision(decision)}\n```\n"
