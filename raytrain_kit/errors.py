"""Error tiers the CLI maps to exit codes.

Anything a user can fix is a `KitError` (a `ValueError`), printed by the CLI as one line per
problem with no traceback: `ConfigError` and `DataError` exit 2, `PreflightError` exits 3.
Programmer invariants use `assert`. Exercised by `raytrain-kit validate CONFIG`.
"""


def short_message(error: BaseException, *, last_line: bool = False) -> str:
    """One line of an exception's text for a one-line error: its first non-empty line (or its
    last, where the useful part of a remote traceback ends), whitespace folded, at most 300
    characters."""
    lines = [" ".join(ln.split()) for ln in str(error).splitlines() if ln.strip()]
    if not lines:
        return repr(error)
    return (lines[-1] if last_line else lines[0])[:300]


def traceback_text(error: BaseException) -> str:
    """An exception's full traceback as text (for logs and --verbose, never the first line)."""
    import traceback

    return "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()


class KitError(ValueError):
    """A problem the user can fix; `problems` holds one message per line."""

    exit_code = 2

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class ConfigError(KitError):
    """The experiment YAML, an override, or a combination of settings is invalid."""


class DataError(KitError):
    """A data file or its schema cannot be used for this experiment."""


class PreflightError(KitError):
    """The preflight gradient check failed: training would learn from wrong gradients."""

    exit_code = 3

    def __init__(self, *problems: str, details: str = "", report: dict | None = None):
        super().__init__(*problems)
        self.details = details  # the report table, printed as is below the error lines
        self.report = report  # the report itself, for `check --json`


class RunError(KitError):
    """The run itself failed (a worker raised, the cluster lost it); exit code 1. `traceback`:
    Ray's account of the failure, which the CLI prints only with --verbose."""

    exit_code = 1

    def __init__(self, *problems: str, traceback: str = ""):
        super().__init__(*problems)
        self.traceback = traceback
