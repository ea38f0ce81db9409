"""Optional extras (pyproject.toml `[project.optional-dependencies]`): a clear error naming the
extra to install when a role's package is missing, instead of a bare ModuleNotFoundError.

    require("kfp", "kfp.kubernetes", extra="cluster", purpose="`ipa pipeline`")
"""

from __future__ import annotations

import importlib.util

from ipa_lib.core.errors import InputError

# module -> the distribution pip installs it from, where the names differ
DISTRIBUTIONS = {"kfp.kubernetes": "kfp-kubernetes"}


def missing(*modules: str) -> list[str]:
    """The `modules` that cannot be imported here (found without importing them, except a
    dotted name's parent packages)."""
    absent = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package is missing / blocked in sys.modules
            found = False
        if not found:
            absent.append(name)
    return absent


def require(*modules: str, extra: str, purpose: str = "this command") -> None:
    """Raise InputError (exit 2) naming `ipa-align[extra]` when any of `modules` is missing."""
    absent = missing(*modules)
    if absent:
        names = ", ".join(DISTRIBUTIONS.get(m, m) for m in absent)
        verb = "is" if len(absent) == 1 else "are"
        raise InputError(f"{purpose} needs {names}, which {verb} not installed: install ipa-align[{extra}] "
                         f"(from a checkout: pip install -e '.[{extra}]')")
