"""The package's shape: imports flow one way, one registry, every switch declared."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pdserve.common import env
from pdserve.common.registry import Registry, UnknownName

ROOT = Path(__file__).resolve().parents[1]
# Each folder may import the folders listed after it (and itself), never one before it.
ORDER = ("router", "benchmarks", "prefill", "decode", "server", "engine", "model", "transfer", "bootstrap", "common")
ALLOWED = {
    "common": {"common"},
    "bootstrap": {"bootstrap", "common"},
    "transfer": {"transfer", "bootstrap", "common"},
    "model": {"model", "common"},
    "engine": {"engine", "model", "common"},
    "server": {"server", "common"},
    "prefill": {"prefill", "engine", "model", "transfer", "bootstrap", "common"},
    "decode": {"decode", "engine", "model", "transfer", "bootstrap", "common"},
    "router": {"router", "bootstrap", "common"},
    "benchmarks": {"benchmarks", "common", "model", "engine", "server", "transfer", "bootstrap"},
}


def _sources() -> list[Path]:
    """The package's Python files (hidden folders, such as local wheel caches, left out)."""
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def _imports(path: Path) -> set[str]:
    """Top-level pdserve folders a module imports, type-checking imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "pdserve" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_flow_one_way(folder: str) -> None:
    wrong = {str(p.relative_to(ROOT)): sorted(_imports(p) - ALLOWED[folder])
             for p in (ROOT / folder).rglob("*.py")}
    assert {k: v for k, v in wrong.items() if v} == {}


def _module_graph() -> dict[str, set[str]]:
    """pdserve module -> the pdserve modules it imports anywhere (type-checking and lazy imports too)."""
    paths = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in _sources() if p.relative_to(ROOT).parts[0] != "tests"}
    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdserve."):
                base = node.module.removeprefix("pdserve.")
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names}
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def test_no_import_circles() -> None:
    graph, state, stack = _module_graph(), {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", f"import circle: {' -> '.join(stack[stack.index(dep):] + [dep])}"
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert len(graph) > 80  # the walk saw the package


def test_the_registry_loads_lazily_and_names_what_it_knows() -> None:
    reg: Registry[object] = Registry("widget", {"json": "json:dumps"})
    reg.add("len", len)
    assert reg.names() == ("json", "len")
    import json

    assert reg.get("json") is json.dumps and reg.get("len") is len
    with pytest.raises(UnknownName, match="unknown widget 'nope'; known: json, len"):
        reg.get("nope")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("len", abs)
    reg.add("json", json.dumps)  # the object a lazy entry names is the same entry


def test_every_registry_resolves_its_cpu_entries() -> None:
    from pdserve.engine.role import ROLES
    from pdserve.model.attention.base import ATTENTION_BACKENDS
    from pdserve.model.models.registry import MODELS
    from pdserve.router.policies import POLICIES
    from pdserve.transfer.base import TRANSFER_BACKENDS

    assert ROLES.names() == ("decode", "null", "prefill")
    for name in ROLES.names():
        assert ROLES.get(name).__name__.endswith("Role")
    assert ATTENTION_BACKENDS.get("torch").__name__ == "TorchAttention"
    assert {MODELS.get(a).__name__ for a in MODELS.names()} == {"CausalLM"}
    assert POLICIES.names() == ("cache_aware", "power_of_two", "random", "round_robin")
    assert TRANSFER_BACKENDS.get("nixl").__name__ == "NixlAgent"


def test_environment_switches_are_declared_in_one_module() -> None:
    readers = []
    for path in _sources():
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "tests" or rel == Path("common/env.py"):
            continue
        if "os.environ" in path.read_text() or "getenv(" in path.read_text():
            readers.append(str(rel))
    assert readers == []
    assert env.MODEL_DIR.get({"PDSERVE_MODEL_DIR": "/m"}) == "/m" and env.MODEL_DIR.get({}) is None
