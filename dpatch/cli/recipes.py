"""``dpatch recipes``: the published recipes, with their sources."""

from __future__ import annotations

from dpatch.cli._app import app, echo_json, out
from dpatch.cli._options import JsonOpt

__all__: list[str] = []


@app.command("recipes")
def recipes_cmd(as_json: JsonOpt = False) -> None:
    """List published stochastic-depth recipes and where their numbers come from.

    Example: dpatch inject timm:vit_base_patch16_224 --recipe deit3-in1k -o vit-dp.safetensors
    """
    from dpatch.recipes import list_recipes

    recipes = list_recipes()
    if as_json:
        echo_json([r.to_dict() for r in recipes])
    else:
        from dpatch.report import render_recipes

        render_recipes(out(), recipes)
