"""`ipa --log-level LEVEL` / `-v`: one rich handler on stderr for every `ipa` command.

Library modules log through `logging.getLogger(__name__)` and never configure handlers;
the CLI does it here, once per process (a second `main()` call only changes the levels).
The default is WARNING; `-v` is INFO, `-vv` DEBUG (MediaPipe's own log lines, which
`ipa_lib.data.hands.landmarker` keeps off stderr, show at DEBUG). `ipa_lib` loggers get the
chosen level; other libraries stay at WARNING unless DEBUG is asked for.
"""

from __future__ import annotations

import logging

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_handler: logging.Handler | None = None


def resolve_level(log_level: str | None, verbose: int = 0) -> int:
    """--log-level wins; else WARNING, INFO for -v, DEBUG for -vv."""
    if log_level:
        return logging.getLevelName(log_level.upper())
    return (logging.WARNING, logging.INFO)[verbose] if verbose < 2 else logging.DEBUG


def setup_logging(level: int) -> logging.Handler:
    """Install the stderr handler on the root logger (once) and set the levels; returns it."""
    global _handler
    if _handler is None:
        from rich.console import Console
        from rich.logging import RichHandler

        _handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False,
                               rich_tracebacks=False, markup=False)
        _handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger().addHandler(_handler)
    _handler.setLevel(level)
    logging.getLogger().setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    logging.getLogger("ipa_lib").setLevel(level if level < logging.WARNING else logging.NOTSET)  # else: the root's
    return _handler
