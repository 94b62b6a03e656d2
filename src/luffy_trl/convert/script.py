"""Reading a launch script: its `key=value` Hydra overrides and its shell variables, substituted."""

from __future__ import annotations

import re
import shlex


def read_overrides(text: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The `key=value` Hydra overrides of a launch script (or of a file of such lines), in order, and the shell
    variables the script assigns."""
    text = re.sub(r"\\\r?\n", " ", text)
    variables, overrides = {}, []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: take the line as plain words
            tokens = line.split()
        if tokens and tokens[0] == "export":
            tokens = tokens[1:]
        for token in tokens:
            match = re.fullmatch(r"(\+{0,2})([A-Za-z_][\w.\-]*)=(.*)", token, re.S)
            if not match:
                continue
            key, value = match.group(2), match.group(3)
            if "." in key:
                overrides.append((key, value))
            elif len(tokens) == 1 or tokens.index(token) == 0:  # VAR=value (an assignment, not a command's env)
                variables[key] = value
    for _ in range(len(variables)):  # variables built from other variables (ROOT=/x; DATA=$ROOT/data)
        resolved = {name: substitute(value, variables) for name, value in variables.items()}
        if resolved == variables:
            break
        variables = resolved
    return [(key, substitute(value, variables)) for key, value in overrides], variables


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def substitute(text: str, variables: dict[str, str]) -> str:
    """`$VAR`, `${VAR}` and `${VAR:-default}` replaced by the script's assignments (a `${VAR:-default}` the script
    does not assign takes its default); anything else is left as it is (see `unresolved_variables`)."""

    def replace(match):
        name = match.group(1) or match.group(3)
        if name in variables:
            return variables[name]
        if match.group(2) is not None:
            return match.group(2)
        return match.group(0)

    return _VARIABLE.sub(replace, text)


def unresolved_variables(text: str) -> list[str]:
    """Shell variables still in `text` after `substitute` (`$@` and `$1` are not variables of the script)."""
    return [m.group(1) or m.group(3) for m in _VARIABLE.finditer(text)]


def _hydra_list(text: str) -> list[str] | None:
    """A Hydra list value (`[a,b]`, `['a', 'b']`) as a list of strings, or None when `text` is not a list."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    return [item.strip().strip("'\"") for item in text[1:-1].split(",") if item.strip()]


