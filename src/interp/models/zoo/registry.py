"""The zoo's table of recipes: name -> :class:`~interp.models.zoo.recipe.Recipe`.

Recipe modules are imported lazily (on the first lookup) so that ``import interp.models.zoo`` stays
cheap; each module exposes ``RECIPE`` or ``RECIPES``.
"""

from __future__ import annotations

import importlib
from functools import cache

from interp.errors import InputError, closest
from interp.models.zoo.recipe import Recipe

# Order here is the order of ZOO_NAMES / describe().
_MODULES: dict[str, str] = {
    "induction-2l": "interp.models.zoo.induction",
    "induction-1l": "interp.models.zoo.induction",
    "modadd-113": "interp.models.zoo.modadd",
    "tms-5-2": "interp.models.zoo.tms",
    "tms-5-2-uniform": "interp.models.zoo.tms",
    "tms-20-5": "interp.models.zoo.tms",
    "tms-20-5-linear": "interp.models.zoo.tms",
    "tms-200-20": "interp.models.zoo.tms",
    "digits-cnn": "interp.models.zoo.digits",
    "digits-softmax": "interp.models.zoo.digits",
    "icl-gd": "interp.models.zoo.icl_gd",
    "clock-pizza-a1": "interp.models.zoo.clock_pizza",
    "clock-pizza-a0": "interp.models.zoo.clock_pizza",
    "grammar-4l": "interp.models.zoo.grammar",
}

ZOO_NAMES: tuple[str, ...] = tuple(_MODULES)


@cache
def _recipes_of(module_name: str) -> dict[str, Recipe]:
    module = importlib.import_module(module_name)
    recipes = getattr(module, "RECIPES", None) or [module.RECIPE]
    return {r.name: r for r in recipes}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name is an InputError listing the valid ones."""
    if not isinstance(name, str) or name not in _MODULES:
        suggestions = closest(str(name), ZOO_NAMES)
        hint = f" Did you mean {', '.join(map(repr, suggestions))}?" if suggestions else ""
        raise InputError(f"Unknown zoo model {name!r}.{hint} Valid names: {', '.join(ZOO_NAMES)}.")
    return _recipes_of(_MODULES[name])[name]
