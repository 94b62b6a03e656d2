"""The names of LUFFY's evaluation benchmarks, in the order of LUFFY's tables.

A leaf module: `runner` (which scorer a benchmark gets), `report` (which columns are averaged together) and `cli`
(the default benchmark list) all read these names, and none of them needs to import another for it.
"""

LUFFY_MATH_BENCHMARKS = ("aime", "aime25", "amc", "math", "minerva", "olympiad_bench")
LUFFY_OOD_BENCHMARKS = ("arc_c", "gpqa", "mmlu_pro")  # multiple choice: the gold is an option letter
