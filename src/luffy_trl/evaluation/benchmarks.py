"""The names of LUFFY's evaluation benchmarks, in the order of LUFFY's tables, and where their files are.

A leaf module: `runner` (which scorer a benchmark gets), `report` (which columns are averaged together) and `cli`
(the default benchmark list) all read these names, and none of them needs to import another for it.
LUFFY's benchmark files ship with the package (`data/`, provenance and licences in `data/README.md`).
"""

from pathlib import Path

LUFFY_MATH_BENCHMARKS = ("aime", "aime25", "amc", "math", "minerva", "olympiad_bench")
LUFFY_OOD_BENCHMARKS = ("arc_c", "gpqa", "mmlu_pro")  # multiple choice: the gold is an option letter


def benchmark_dir() -> Path:
    """The folder of LUFFY's benchmark files shipped with luffy-trl (`valid.all.parquet`, `valid.arc_c.parquet`,
    `valid.gpqa.parquet`)."""
    return Path(__file__).resolve().parent / "data"
