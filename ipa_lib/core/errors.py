"""One exception base and one exit-code policy for every `ipa` command.

- `InputError` (exit 2): the user's input or configuration is wrong: a params key, a
  missing or corrupt file, a video that does not decode, data that fails its checks.
  The message names the file / field and the problem.
- `RuntimeFailure` (exit 1): the input was fine but the work failed: training diverged,
  the tracking server or the KFP API did not answer, a pipeline task failed.

`exit_code(err)` is the whole policy; the CLI maps exceptions by class through it.
Python's own `ValueError` and the OS's path errors (`FileNotFoundError`,
`NotADirectoryError`, `IsADirectoryError`, `PermissionError`) count as bad input; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_INPUT_LIKE = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class IpaError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = EXIT_FAILURE


class InputError(IpaError, ValueError):
    """Bad input or configuration (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class RuntimeFailure(IpaError, RuntimeError):
    """The work itself failed (exit 1)."""

    exit_code = EXIT_FAILURE


def exit_code(err: BaseException) -> int | None:
    """The exit code for `err`, or None when it is not an expected error (a bug: re-raise)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, IpaError):
        return int(err.exit_code)
    if isinstance(err, _INPUT_LIKE):
        return EXIT_BAD_INPUT
    return None
