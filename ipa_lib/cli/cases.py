"""`ipa cases build ...` and `ipa cases check DIR` (docs/cases.md).

build: one case folder per (driving, reference) pair (`ipa_lib.data.case_build`); a bad pair
is reported with its files and skipped; prints processed + failed = given; exit 2 when any
pair failed (the others are built). check: probes every case of DIR against the data params,
runs the Great Expectations case suite, prints case id | split | ok | error; exit 2 when a
case is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _params(args, cases: str | None = None):
    """params.yaml (+ --set); without a params file at the default path, the built-in defaults."""
    from ipa_lib.core.config import apply_override, load_params, parse_params

    overrides = [*args.set, *([f"data.cases={cases}"] if cases else [])]
    if args.params == "params.yaml" and not Path(args.params).exists():
        data: dict = {}
        for item in overrides:
            apply_override(data, item, "--set")
        return parse_params(data, "--set")
    return load_params(args.params, overrides)


def cmd_build(args) -> int:
    from ipa_lib.data.case_build import build_cases, pair_up

    pair_up(args.driving, args.reference, args.reference_frame, args.keypoints)  # counts first, before params
    params = _params(args)
    result = build_cases(args.driving, args.out, params.data, references=args.reference,
                         reference_frame=args.reference_frame, keypoints=args.keypoints,
                         hand_model=params.gate.hand_landmarker, progress=not args.quiet)  # fmt: skip
    for e in result["errors"]:
        ref = e["reference"] if e["reference"] is not None else f"frame {args.reference_frame}"
        print(f"failed: {e['case_id']} (driving {e['driving']}, reference {ref}): {e['error']}", file=sys.stderr)
    for row in result["cases"]:
        print(f"built {row['path']}: {row['pose_frames']} frames at {row['pose_fps']:g} fps, "
              f"{row['width']}x{row['height']}{', self-reenactment' if row['self_reenactment'] else ''}")  # fmt: skip
    print(f"cases build: processed {result['processed']} + failed {result['failed']} = given {result['given']} "
          f"-> {result['out']}")  # fmt: skip
    return 2 if result["failed"] else 0


def cmd_check(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ipa_lib.data.cases import list_cases, probe_case, split_cases
    from ipa_lib.data.checks import check_cases

    params = _params(args, cases=args.dir)
    data = params.data
    rows = [probe_case(c, data) for c in list_cases(data.cases)]
    splits = split_cases([r["case_id"] for r in rows if r["ok"]], data.val_fraction, data.test_fraction)
    for r in rows:
        r["split"] = splits.get(r["case_id"])
    table = Table(title=f"cases in {data.cases} ({sum(r['ok'] for r in rows)}/{len(rows)} usable)")
    for col in ("case id", "split", "ok", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["case_id"], r["split"] or "-", "yes" if r["ok"] else "[red]no[/red]", r["error"] or "")
    Console(width=max(100, Console().width)).print(table)
    check_cases(rows, data)  # DataCheckError (exit 2) on any rule beyond a refused case
    return 2 if any(not r["ok"] for r in rows) else 0


def add_params_args(p, example: str) -> None:
    """`--params FILE` and repeatable `--set KEY=VALUE`, as on every command that reads params."""
    p.add_argument("--params", default="params.yaml", metavar="FILE",
                   help="params file (default: params.yaml; built-in defaults when there is none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a param, e.g. {example} (repeatable)")


def add_commands(sub) -> None:
    """`ipa cases build|check` on the top-level subparsers `sub`."""
    cases = sub.add_parser("cases", help="Wan-Animate case folders: build from raw videos, check")
    cases = cases.add_subparsers(dest="cases_cmd", required=True, metavar="COMMAND")
    p = cases.add_parser("build", help="build case folders from driving videos and reference images",
                         description="One case per (driving, reference) pair, in the order given (docs/cases.md).")
    p.add_argument("--driving", nargs="+", required=True, metavar="VIDEO", help="driving videos")
    p.add_argument("--reference", nargs="+", metavar="IMAGE", help="reference images, one per driving video")
    p.add_argument("--reference-frame", type=int, metavar="N",
                   help="self-reenactment: the reference is frame N of the resampled driving video")
    p.add_argument("--keypoints", nargs="+", metavar="JSON",
                   help="whole-body keypoints per driving video (133 COCO-WholeBody or 134 DWPose points per frame)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder of case folders to write into")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_params_args(p, "data.height=480")
    p.set_defaults(func=cmd_build)
    p = cases.add_parser("check", help="probe and check every case of a folder",
                         description="Probe every case of DIR against the data params and run the case checks.")
    p.add_argument("dir", metavar="DIR", help="folder of case folders")
    add_params_args(p, "data.frames=77")
    p.set_defaults(func=cmd_check)
