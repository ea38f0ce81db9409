"""`ipa report`: options -> `ipa_lib.analysis.report.write_report`, then the claims on stdout."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `ipa report` arguments (`ipa report` runs `main`; tests parse with this and call `report_main`)."""
    p.add_argument("--cells", default="results/paper", help="folder of collected grid cells (scripts/paper_grid.py; committed)")
    p.add_argument("--out", default="docs/results.md", help="markdown report to write")
    p.add_argument("--images", default=None, help="folder for the PNGs (default: <out without .md>, i.e. docs/results)")
    p.add_argument("--features", default="models/features", help="feature extractors for FD (trained there if missing)")
    p.add_argument("--extractor", default=None, metavar="MODULE:CALLABLE",
                   help="use any callable clips (N,F,H,W,3) uint8 -> (N,D) features for FD and hand FD instead of the toy extractors")
    p.add_argument("--no-fd", action="store_true", help="skip Frechet distances (no extractor needed)")
    p.add_argument("--params", default="params.yaml", help="params file (promote.tolerances for the 'no harm' check)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--primary", default="hand_psnr",
                   help="metric the claims are judged on (default hand_psnr: ground truth the gate never saw; hand_quality is the gate's own scorer)")
    p.add_argument("--experiments", default="results/experiments",
                   help="collected experiment cells (scripts/experiments.py) to append with their verdicts (skipped when absent)")
    p.add_argument("--command", default="make paper-table", help="the regenerate command named in the report")
    p.add_argument("--quiet", action="store_true", help="print nothing (no claims, no 'wrote ...' line)")
    return p


def report_main(args: argparse.Namespace) -> int:
    """Run `write_report` with the parsed options; print each claim's verdict unless --quiet."""
    from ipa_lib.analysis.report import write_report

    result = write_report(args.cells, args.out, images=args.images, params=args.params, overrides=args.set,
                          features=args.features, extractor=args.extractor, fd=not args.no_fd, level=args.level,
                          n_boot=args.bootstrap, primary=args.primary, command=args.command, experiments=args.experiments)
    if not args.quiet:
        for c in result["claims"]:
            print(f"[round {c.round}] {c.text}: {c.verdict} ({c.evidence})")
        for pr in result.get("predictions", []):
            print(f"[{pr.grid}] {pr.text}: {pr.verdict} ({pr.evidence})")
        print(f"wrote {result['out']} and {result['images_dir']}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`ipa report [options]` (`ipa_lib.cli.cmd_report` passes the arguments after `report`)."""
    parser = add_arguments(argparse.ArgumentParser(prog="ipa report", description="the method x beta table, curves and claims"))
    return report_main(parser.parse_args(argv))
