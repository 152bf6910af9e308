"""The ``dpatch`` command line: parse, call the library, render.

:mod:`dpatch.cli._app` holds the app, the mapping from exceptions to exit codes and the
console helpers; each command lives in the module named for it and registers itself on
import, in the order ``dpatch --help`` lists them: the order a user meets them. No command
module imports torch until its command runs.
"""

from __future__ import annotations

# isort: off
# Commands register on import, in this order (``dpatch --help`` lists them so).
from dpatch.cli import inject, inspect, retune, verify  # noqa: F401
from dpatch.cli import schedule, recipes, list  # noqa: F401
from dpatch.cli import sensitivity, prune, fold  # noqa: F401
from dpatch.cli import env  # noqa: F401

# isort: on
from dpatch.cli._app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
