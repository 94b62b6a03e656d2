"""The package's layout: no import cycle between luffy_trl's modules, and the trainer is a package of mixins.

Every `import` / `from ... import` of a luffy_trl module counts, at module level or inside a function (a lazy import
inside a function is still a cycle a reader has to untangle), except those under `if TYPE_CHECKING:`. A module
importing its own parent package (implied by every `from luffy_trl.x.y import ...`) is not an edge.
"""

import ast
from pathlib import Path

import luffy_trl

PACKAGE_ROOT = Path(luffy_trl.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(n) for child in node.body for n in ast.walk(child))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import sub` imports the submodule when `sub` is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import luffy_trl.losses.x` -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: _imported_modules(path, name, modules) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "luffy_trl.trainer.mixed_policy" in graph and "luffy_trl.evaluation.runner" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_lazy_import_cycle():
    """The checker can fail: the report <-> runner circle this layout removed is found when put back."""
    graph = import_graph()
    graph["luffy_trl.evaluation.report"].add("luffy_trl.evaluation.runner")
    assert graph["luffy_trl.evaluation.runner"] >= {"luffy_trl.evaluation.report"}
    assert find_cycle(graph) is not None


def test_trainer_is_a_package_of_mixins():
    from luffy_trl import MixedPolicyGRPOTrainer
    from luffy_trl.trainer import IS_OFF_POLICY, TEACHER_LOGPS, teacher_slot  # noqa: F401
    from luffy_trl.trainer.checkpoint import GenerationCheckpointMixin
    from luffy_trl.trainer.generation import TeacherGenerationMixin
    from luffy_trl.trainer.live_teacher import LiveTeacherMixin
    from luffy_trl.trainer.loss import MixedLossMixin
    from luffy_trl.trainer.micro_batches import PaddingFreeBatchingMixin

    assert (PACKAGE_ROOT / "trainer" / "__init__.py").exists()
    assert MixedPolicyGRPOTrainer.__module__ == "luffy_trl.trainer.mixed_policy"
    mixins = {GenerationCheckpointMixin, TeacherGenerationMixin, LiveTeacherMixin, MixedLossMixin,
              PaddingFreeBatchingMixin}
    assert mixins <= set(MixedPolicyGRPOTrainer.__mro__)
    assert not list(PACKAGE_ROOT.glob("trainer_*.py")), "trainer pieces belong in luffy_trl/trainer/"
