"""``dpatch retune``: change the rates of an existing patch or of native slots, and save.

It takes ``inject``'s options; the command's name tells the shared function which library
call to make."""

from __future__ import annotations

from dpatch.cli._app import app
from dpatch.cli.inject import inject_cmd

__all__: list[str] = []

RETUNE_HELP = """Change the rates of an existing patch (a dpatch file) or of native slots, and save.

The schedule kind and per stay as the file has them, mode, scaling, skipping and seeds as
each site has them, unless given.

Example: dpatch retune resnet50-dp.safetensors --max-rate 0.3 -o resnet50-dp3.safetensors
"""

app.command("retune", help=RETUNE_HELP)(inject_cmd)
