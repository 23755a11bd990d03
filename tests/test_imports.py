"""The package reads bottom-up: no import circle, and every module imports only those listed above it in the
package docstring's module map. Every import counts: module level, inside functions, and under TYPE_CHECKING."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import accelerate_offload

PACKAGE = Path(accelerate_offload.__file__).parent
NAME = PACKAGE.name


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules one import statement loads (a submodule if the name is one, else its module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    return [f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target for alias in node.names]


def imports_of(module: str, source: str) -> set[str]:
    """The package modules `source` (the text of `module`) imports anywhere in its tree."""
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update(target for target in _resolve(module, node) if target in MODULES)
    return imported - {module}


def import_graph() -> dict[str, set[str]]:
    return {module: imports_of(module, path.read_text(encoding="utf-8")) for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert graph[f"{NAME}.offload"] >= {f"{NAME}.conductor", f"{NAME}.block_hook", f"{NAME}.registry"}  # it sees
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_check_sees_function_level_and_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .conductor import LayerOffloadConductor\n"
        "def trace():\n    from .offload import get_conductor\n    from .models import flux\n"
    )
    found = imports_of(f"{NAME}.streams", source)
    assert found == {f"{NAME}.conductor", f"{NAME}.offload", f"{NAME}.models.flux"}
    graph = import_graph()
    graph[f"{NAME}.streams"] |= found
    assert find_cycle(graph) is not None


def test_every_module_imports_only_those_above_it_in_the_module_map() -> None:
    listed = [f"{NAME}.{name}" for name in re.findall(r"`([\w.]+)`", accelerate_offload.__doc__)]
    order = [module for module in dict.fromkeys(listed) if module in MODULES]
    packages = {module for module, path in MODULES.items() if path.name == "__init__.py"}
    assert set(order) == set(MODULES) - packages, "the module map lists every module"
    graph = import_graph()
    for position, module in enumerate(order):
        upward = sorted(target for target in graph[module] if target in order and order.index(target) > position)
        assert not upward, f"{module} imports {upward}, listed below it"


def test_streaming_t5_imports_no_diffusers() -> None:
    """Embedding prompts with a streamed T5 must work without diffusers: only a family's chunk mirror imports it."""
    code = "\n".join([
        "import sys, torch",
        f"from {NAME} import offload_model",
        "from transformers import T5Config, T5EncoderModel",
        "model = T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4))",
        "offload_model(model.requires_grad_(False), 'cpu', layer_offload_fraction=1.0, gradient_checkpointing=False,",
        "              sequence_chunks='auto')",
        "with torch.no_grad():",
        "    model(torch.zeros(1, 5, dtype=torch.long))",
        "print('diffusers' in sys.modules)",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "False"
