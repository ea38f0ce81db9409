"""Run the alignment round for several round seeds as DVC experiments and tabulate them.

Round seed r changes what is random in a round (which driving poses and generator seeds
are sampled: `sample.seed = 1000 + 1000 r`; LoRA init and batches: `train.seed = r`);
the held-out evaluation poses and seeds stay fixed, so rounds are comparable. Seed 0 is
the committed default and runs last, which leaves the workspace on the default round
(DVC's run cache restores it without recomputing when nothing changed).

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

METRICS = ("hand_quality", "hand_pass_rate", "psnr", "ssim", "hand_psnr")


def run_round(seed: int) -> tuple[dict, float]:
    started = time.time()
    cmd = ["dvc", "exp", "run", "-S", f"sample.seed={1000 + 1000 * seed}", "-S", f"train.seed={seed}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(Path("metrics/eval.json").read_text()), time.time() - started


def table(results: dict[int, dict]) -> str:
    seeds = sorted(results)
    lines = [
        f"Rounds with seeds {seeds} (mean ± std over rounds; each round's numbers are means over "
        "48 held-out poses x 3 evaluation seeds).",
        "",
        "| metric | base | IPA | IPA - base |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        b = np.array([results[s]["base"][m] for s in seeds])
        a = np.array([results[s]["ipa"][m] for s in seeds])
        d = a - b
        lines.append(f"| {m} | {b.mean():.3f} ± {b.std():.3f} | {a.mean():.3f} ± {a.std():.3f} | {d.mean():+.3f} ± {d.std():.3f} |")
    lines += ["", "Per round:", "", "| seed | " + " | ".join(f"base {m} | IPA {m}" for m in ("hand_pass_rate", "psnr")) + " |",
              "|---|" + "---|" * 4]
    for s in seeds:
        r = results[s]
        lines.append(f"| {s} | {r['base']['hand_pass_rate']:.3f} | {r['ipa']['hand_pass_rate']:.3f} | {r['base']['psnr']:.2f} | {r['ipa']['psnr']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="docs/seeds.md")
    args = parser.parse_args()
    order = sorted(args.seeds, key=lambda s: (s == 0, s))  # default round last
    results, seconds = {}, {}
    for s in order:
        results[s], seconds[s] = run_round(s)
        print(json.dumps({"seed": s, "seconds": round(seconds[s]), **results[s]}), flush=True)
    text = table(results)
    text += "\nWall time per round (s, this machine): " + ", ".join(f"seed {s}: {seconds[s]:.0f}" for s in sorted(seconds)) + "\n"
    text += "\nReproduce: `make seeds` (runs `python scripts/seeds_table.py --seeds " + " ".join(map(str, args.seeds)) + "`).\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# Seeds table\n\n" + text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"results": results, "seconds": seconds}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
