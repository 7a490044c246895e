"""One line instead of a traceback when a command runs in an interpreter without racer-vec's
dependencies (a `python` other than .venv's, README: Set up). Standard library only: it must work
where nothing else can be imported.
"""

from __future__ import annotations

import sys

OWN_PACKAGES = ("racer_vec", "configs")


def missing_dependency(exc: BaseException) -> str | None:
    """The third-party package whose import raised `exc`, or None: a module of racer-vec's own that
    cannot be found is a bug, and keeps its traceback."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    package = exc.name.partition(".")[0]
    return None if package in OWN_PACKAGES else package


def report_missing_dependencies() -> None:
    """From here on, an uncaught ModuleNotFoundError of a third-party package ends the process with
    one line on stderr (exit 1, Python's for an uncaught exception); anything else as before.

    Not a switch to .venv's interpreter: the user chose this one, and learns how to pick the other.
    """
    previous = sys.excepthook

    def hook(kind, exc, traceback):
        package = missing_dependency(exc)
        if package is None:
            previous(kind, exc, traceback)
            return
        print(
            f"racer-vec: missing dependency '{package}' for this interpreter ({sys.executable}); "
            "run `make test` once to create .venv, then `source .venv/bin/activate`",
            file=sys.stderr,
        )

    sys.excepthook = hook
