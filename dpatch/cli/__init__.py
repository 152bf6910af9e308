"""The ``dpatch`` command line: parse, call the library, render.

:mod:`dpatch.cli._app` holds the app, the mapping from exceptions to exit codes and the
console helpers; each command lives in the module named for it and registers itself on
import.
"""

from __future__ import annotations

from dpatch.cli import (  # noqa: F401 - commands register on import
    depth,
    env,
    inspecting,
    listing,
    patching,
    recipes_cmd,
    verifying,
)
from dpatch.cli._app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
