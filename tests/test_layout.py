"""The package's shape: no import cycle between modules, commands stay thin, no module grows unbounded."""

from __future__ import annotations

import ast
from pathlib import Path

import lora_exp

PACKAGE = Path(lora_exp.__file__).resolve().parent
COMMANDS = ("train", "plan", "evaluate", "generate", "export", "report", "paper", "reproduce")
MAX_LINES = 420  # ~400: a module past it holds two things
KNOWN_LARGE: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every lora_exp module ``path`` imports, at module level or inside functions alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_exp"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lora_exp"))
    return {m for m in found if m in modules and m != "lora_exp"}


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, m, dep])
            if dep not in state:
                visit(dep, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_commands_are_thin_and_nothing_imports_them():
    modules = _modules()
    for command in COMMANDS:
        assert len(modules[f"lora_exp.{command}"].read_text().splitlines()) < 100, command
    for name, path in modules.items():
        if name.removeprefix("lora_exp.") in (*COMMANDS, "cli", "__main__"):
            continue
        imported = {m.removeprefix("lora_exp.") for m in _imports(path, modules)}
        assert not imported & set(COMMANDS), (name, imported & set(COMMANDS))


def test_no_module_over_the_size_limit():
    large = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in KNOWN_LARGE
    }
    assert not large, large
