"""`ipa cluster preflight`: what a pipeline run needs in the cluster, checked and shown."""

from __future__ import annotations


def cmd_preflight(args) -> int:
    """0 when every check passes, 1 when one fails, 2 on bad params (the CLI's error policy)."""
    from rich.console import Console

    from ipa_lib.core.config import load_params
    from ipa_lib.orchestration.cluster import preflight, render

    params = load_params(args.params, getattr(args, "set", None))
    report = preflight(params, context=args.context)
    render(report, Console())
    return 0 if report.ok else 1
