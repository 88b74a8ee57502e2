"""The tree is the architecture (docs/architecture.md): imports point down, never in a cycle,
and nothing in the core imports the simulator. Checked from the source, module by module."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.support import REPO

AGENT = REPO / "agent"

# Lower layers never import higher ones; a package may import its own layer.
LAYERS: dict[str, int] = {
    "agent.errors": 0, "agent.runtime": 0, "agent.proto": 0, "agent.config": 0,
    "agent.store": 1,
    "agent.hw": 2, "agent.isolation": 2, "agent.scrub": 2, "agent.attest": 2, "agent.identity": 2,
    "agent.partitions": 3, "agent.health": 3, "agent.audit": 3,
    "agent.admin": 4, "agent.link": 4, "agent.controller": 4, "agent.metrics": 4,
    "agent.daemon": 5,
    "agent.cli": 6, "agent.bench": 6, "agent.sim": 6,
}  # fmt: skip
# Only these may import the simulated node (it is for tests, the demo and benchmarks).
MAY_USE_SIM = ("agent.sim", "agent.cli", "agent.bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("agent")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agent"):
            found.add(node.module)
            # `from agent.isolation import bpf` imports a module too.
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _sources() -> dict[str, Path]:
    return {
        _module_name(path): path
        for path in AGENT.rglob("*.py")
        if "proto" not in path.relative_to(AGENT).parts
    }


def _layer(module: str) -> tuple[str, int] | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    return None


def test_every_package_has_a_layer() -> None:
    unplaced = sorted(m for m in _sources() if m != "agent" and _layer(m) is None)
    assert not unplaced, f"give these a layer in LAYERS (and docs/architecture.md): {unplaced}"


def test_imports_point_down() -> None:
    upward = []
    for module, path in _sources().items():
        mine = _layer(module)
        if mine is None:
            continue
        for imported in _imports(path, top_level_only=False):
            theirs = _layer(imported)
            if theirs is not None and theirs[1] > mine[1]:
                upward.append(f"{module} -> {imported}")
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_core_never_imports_the_simulator() -> None:
    offenders = [
        f"{module} -> {imported}"
        for module, path in _sources().items()
        if not module.startswith(MAY_USE_SIM)
        for imported in _imports(path, top_level_only=False)
        if imported == "agent.sim" or imported.startswith("agent.sim.")
    ]
    assert not offenders, offenders


def test_no_import_cycle() -> None:
    sources = _sources()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in sources.items():
        graph[module] = {m for m in _imports(path, top_level_only=True) if m in sources}
    visiting: list[str] = []
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append([*visiting[visiting.index(module) :], module])
            return
        visiting.append(module)
        for target in sorted(graph[module]):
            # A package importing its own submodules (its boundary re-exporting) is not a cycle.
            if target.startswith(module + "."):
                continue
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_over_600_lines_without_a_reason() -> None:
    long = []
    for module, path in _sources().items():
        lines = path.read_text().splitlines()
        head = "\n".join(lines[:30]).lower()
        if len(lines) > 600 and "over 600 lines" not in head:
            long.append(f"{module} ({len(lines)} lines)")
    assert not long, "split these, or say at the top why they are over 600 lines: " + ", ".join(
        long
    )
