"""`luffy-trl convert`: a LUFFY / verl launch script's Hydra overrides -> a luffy-trl recipe YAML.

    luffy-trl convert exp_scripts/train.sh                 # prints the recipe
    luffy-trl convert train.sh --gpus 8 -o luffy.yaml      # writes it

The input is a shell script that runs `python -m verl.mix_src.main_mix_ppo key=value ...` (line continuations,
comments and `VAR=value` / `export VAR=value` assignments are understood; `$VAR`, `${VAR}` and `${VAR:-default}` are
substituted, also inside other assignments), or a file of `key=value` lines. Every flag ends up either as a recipe
field (with the LUFFY flag it came from in a comment) or in a commented list of flags that have no equivalent, each
with the reason. Flags that LUFFY's loss function accepts but never reads, and settings that are no-ops at their
value, are listed too. The full table is docs/migrating.md; the conversion is a pure function (`convert_overrides`).

A summary goes to stderr: every flag whose recipe would train something other than the script ("differs"), every
flag the converter does not know (a typo?), every shell variable left unresolved and every field set from a default
rather than from the script. The command exits 1 when the recipe differs from the script, a flag is unknown or a
variable is unresolved (`--allow_differences` exits 0 all the same), 2 on unusable input. `--check` also parses the
recipe with `luffy-trl train`'s parser (CPU, no model), so a recipe that would not load fails here.

Modules: `script` (the launch script's overrides and shell variables), `flags` (the tables of flags without a field
and of no-op values), `mapping` (the pure conversion, `convert_overrides`), `command` (the recipe text, the summary,
`--check` and the command line).
"""

from luffy_trl.convert.command import check_recipe, main, render, summary
from luffy_trl.convert.flags import LUFFY_FLAGS, NOOPS, REASONS, REWARD_VERSIONS
from luffy_trl.convert.mapping import DEFAULTED, Converted, convert_overrides
from luffy_trl.convert.script import read_overrides, substitute, unresolved_variables

__all__ = ["DEFAULTED", "LUFFY_FLAGS", "NOOPS", "REASONS", "REWARD_VERSIONS", "Converted", "check_recipe",
           "convert_overrides", "main", "read_overrides", "render", "substitute", "summary", "unresolved_variables"]
