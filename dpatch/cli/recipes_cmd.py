"""``dpatch recipes``: the published recipes, with their sources."""

from __future__ import annotations

import json

import typer

from dpatch.cli._app import app, out
from dpatch.cli._options import JsonOpt
from dpatch.recipes import list_recipes
from dpatch.report import render_recipes

__all__: list[str] = []


@app.command("recipes")
def recipes_cmd(as_json: JsonOpt = False) -> None:
    """List published stochastic-depth recipes and where their numbers come from.

    Example: dpatch inject timm:vit_base_patch16_224 --recipe deit3-in1k -o vit-dp.safetensors
    """
    recipes = list_recipes()
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in recipes], indent=2))
    else:
        render_recipes(out(), recipes)
