"""Run the alignment round for several round seeds as DVC experiments and tabulate them.

Round seed r changes what is random in a round (which driving poses and generator seeds
are sampled: `sample.seed = 1000 + 1000 r`; LoRA init and batches: `train.seed = r`);
the held-out evaluation poses and seeds stay fixed, so rounds are comparable. Seed 0 is
the committed default and runs last, which leaves the workspace on the default round
(DVC's run cache restores it without recomputing when nothing changed).

Do not commit while it runs: after each workspace experiment DVC restores HEAD to the commit
the experiment started from, so a commit made meanwhile drops off the branch (it stays in
`git reflog`).

    python scripts/seeds_table.py --seeds 0 1 2 --out docs/seeds.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ipa_lib.analysis.render import table_digits
from ipa_lib.core.config import load_params
from ipa_lib.core.io import atomic_write_text
from ipa_lib.core.errors import InputError, exit_code
from ipa_lib.core.metrics import EVAL_METRICS, get

HEADLINE = ("hand_pass_rate", "psnr")  # the per-round columns


def run_round(seed: int, details_path: Path) -> tuple[dict, dict, float]:
    """One `dvc exp run`; its metrics/eval.json, its evaluation protocol (from eval/details.json) and the seconds."""
    started = time.time()
    cmd = ["dvc", "exp", "run", "-S", f"sample.seed={1000 + 1000 * seed}", "-S", f"train.seed={seed}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    details = json.loads(details_path.read_text())
    try:
        protocol = {"num_poses": int(details["num_poses"]), "seeds": [int(x) for x in details["seeds"]]}
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{details_path}: no num_poses / seeds ({err!r})") from None
    return json.loads(Path("metrics/eval.json").read_text()), protocol, time.time() - started


def table(results: dict[int, dict], protocols: dict[int, dict]) -> str:
    """The seeds table: mean +- std over rounds per metric (registry order and labels), then the headline metrics per round."""
    seeds = sorted(results)
    distinct = {json.dumps(protocols[s], sort_keys=True) for s in seeds}
    if len(distinct) != 1:
        raise InputError(f"rounds evaluated on different protocols (evaluate.num_poses / seeds), not comparable: {protocols}")
    proto = protocols[seeds[0]]
    lines = [
        f"Rounds with seeds {seeds} (mean ± std over rounds; each round's numbers are means over "
        f"{proto['num_poses']} held-out poses x {len(proto['seeds'])} evaluation seeds).",
        "",
        "| metric | base | IPA | IPA - base |",
        "|---|---|---|---|",
    ]
    for m in EVAL_METRICS:
        k = table_digits(m)
        b = np.array([results[s]["base"][m] for s in seeds])
        a = np.array([results[s]["ipa"][m] for s in seeds])
        d = a - b
        lines.append(f"| {get(m).label} | {b.mean():.{k}f} ± {b.std():.{k}f} | {a.mean():.{k}f} ± {a.std():.{k}f} | "
                     f"{d.mean():+.{k}f} ± {d.std():.{k}f} |")
    lines += ["", "Per round:", "", "| seed | " + " | ".join(f"base {get(m).label} | IPA {get(m).label}" for m in HEADLINE) + " |",
              "|---|" + "---|" * (2 * len(HEADLINE))]
    for s in seeds:
        r = results[s]
        vals = [f"{r[model][m]:.{table_digits(m)}f}" for m in HEADLINE for model in ("base", "ipa")]
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="docs/seeds.md")
    parser.add_argument("--params", default="params.yaml", help="where evaluate writes details.json (evaluate.out)")
    args = parser.parse_args()
    params_text = Path(args.params).read_text()
    params = load_params(args.params)
    details_path = Path(params.evaluate.out) / "details.json"
    order = sorted(args.seeds, key=lambda s: (s == 0, s))  # default round last
    results, protocols, seconds = {}, {}, {}
    for s in order:
        results[s], protocols[s], seconds[s] = run_round(s, details_path)
        print(json.dumps({"seed": s, "seconds": round(seconds[s]), "evaluation": protocols[s], **results[s]}), flush=True)
    # `dvc exp run -S` rewrites params.yaml (flow lists expanded, nulls blanked); the last round is the
    # default one, so when the values are the file's own, give the file back its formatting and comments
    if load_params(args.params).model_dump() == params.model_dump():
        atomic_write_text(args.params, params_text)
    text = table(results, protocols)
    text += "\nWall time per round (s, this machine): " + ", ".join(f"seed {s}: {seconds[s]:.0f}" for s in sorted(seconds)) + "\n"
    text += "\nReproduce: `make seeds` (runs `python scripts/seeds_table.py --seeds " + " ".join(map(str, args.seeds)) + "`).\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# Seeds table\n\n" + text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"results": results, "evaluation": protocols, "seconds": seconds}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except (Exception, KeyboardInterrupt) as err:  # the same policy as `ipa` (ipa_lib.core.errors)
        code = exit_code(err)
        if code is None:
            raise
        print(f"error: {err}", file=sys.stderr)
    sys.exit(code)
