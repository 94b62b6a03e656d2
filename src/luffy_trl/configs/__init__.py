"""Recipes and accelerate configs shipped inside the package (`luffy-trl recipes` lists them).

`recipe_path("qwen2.5-math-7b")` finds a packaged recipe by name (with or without `.yaml`); an existing file path is
returned unchanged, so `--config my_recipe.yaml` and `--config qwen2.5-math-7b` both work.
"""

from __future__ import annotations

import pathlib

HERE = pathlib.Path(__file__).resolve().parent
RECIPES = HERE / "recipes"
ACCELERATE = HERE / "accelerate"


def list_recipes() -> dict[str, pathlib.Path]:
    """Packaged recipes, name -> path."""
    return {p.stem: p for p in sorted(RECIPES.glob("*.yaml"))}


def list_accelerate_configs() -> dict[str, pathlib.Path]:
    """Packaged accelerate configs, name -> path."""
    return {p.stem: p for p in sorted(ACCELERATE.glob("*.yaml"))}


def describe(path: pathlib.Path) -> str:
    """A YAML file's description: its opening comment up to the first command line (`#   luffy-trl ...`), blank
    comment or setting, whole sentences only."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("#  ") or not line.strip("# "):
            break
        words.append(line.lstrip("# ").strip())
    return " ".join(words)


def _find(name: str, table: dict[str, pathlib.Path], kind: str) -> pathlib.Path:
    path = pathlib.Path(name).expanduser()
    if path.is_file():
        return path
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem in table:
        return table[stem]
    raise FileNotFoundError(
        f"{name!r} is neither a file nor a packaged {kind}; packaged {kind}s: {', '.join(table)} "
        "(`luffy-trl recipes` lists them)."
    )


def recipe_path(name_or_path: str) -> pathlib.Path:
    """A recipe file: `name_or_path` if it is a file, else the packaged recipe of that name."""
    return _find(name_or_path, list_recipes(), "recipe")


def accelerate_config_path(name_or_path: str) -> pathlib.Path:
    """An accelerate config file: `name_or_path` if it is a file, else the packaged config of that name."""
    return _find(name_or_path, list_accelerate_configs(), "accelerate config")
