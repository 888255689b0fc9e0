"""The package's shape: imports flow one way, one registry, every switch declared."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from pdserve.common import env
from pdserve.common.registry import Registry, UnknownName
from pdserve.common.roles import Role

ROOT = Path(__file__).resolve().parents[1]
# The files at the package root (commands that assemble the folders below): they
# may import every folder, and nothing imports them.
PACKAGE = "(root)"
# What each folder may import besides itself. Each folder imports only folders
# that never import it back (``test_the_allowed_imports_flow_one_way``).
ALLOWED = {
    "common": set(),
    "web": {"common"},
    "bootstrap": {"web", "common"},
    "transfer": {"bootstrap", "common"},
    "model": {"common"},
    "engine": {"model", "common"},
    "server": {"web", "common"},
    "prefill": {"engine", "model", "transfer", "bootstrap", "common"},
    "decode": {"engine", "model", "transfer", "bootstrap", "common"},
    "router": {"bootstrap", "web", "common"},
    "benchmarks": {"router", "server", "engine", "model", "transfer", "bootstrap", "web", "common"},
}
FOLDERS = set(ALLOWED)
ALLOWED[PACKAGE] = FOLDERS
# A lazy registry entry, "pdserve.folder.module:attr", reaches its module as an import does.
LAZY_ENTRY = re.compile(r"pdserve\.([A-Za-z_][\w.]*):[A-Za-z_]\w*")


def _sources() -> list[Path]:
    """The package's Python files (hidden folders, such as local wheel caches, left out)."""
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def _folder_of(module: str) -> str:
    """The top-level folder of a pdserve module (``web.auth`` -> ``web``), or PACKAGE for
    the root's own modules and names (``cli``, ``__version__``)."""
    top = module.split(".")[0]
    return top if (ROOT / top).is_dir() else PACKAGE


def _imports(path: Path) -> set[str]:
    """Top-level pdserve folders a module reaches: its imports (type-checking and lazy
    ones included, ``from pdserve import name`` too) and the lazy registry entries it names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "pdserve":
            modules = [f"pdserve.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and LAZY_ENTRY.fullmatch(node.value):
            modules = [node.value.partition(":")[0]]
        else:
            continue
        for name in modules:
            parts = name.split(".")
            if parts[0] == "pdserve":
                found.add(_folder_of(".".join(parts[1:])) if len(parts) > 1 else PACKAGE)
    return found


def _files_of(folder: str) -> list[Path]:
    return sorted(ROOT.glob("*.py")) if folder == PACKAGE else sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_flow_one_way(folder: str) -> None:
    allowed = ALLOWED[folder] | {folder}
    wrong = {str(p.relative_to(ROOT)): sorted(_imports(p) - allowed) for p in _files_of(folder)}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_allowed_imports_flow_one_way() -> None:
    """No folder may reach itself through the table: every folder sits above what it imports."""
    def reach(folder: str, seen: set[str]) -> set[str]:
        for dep in ALLOWED[folder] - seen:
            seen.add(dep)
            reach(dep, seen)
        return seen

    assert {f: sorted(reach(f, set())) for f in FOLDERS if f in reach(f, set())} == {}


def test_every_folder_is_in_the_table() -> None:
    package_folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert package_folders == FOLDERS


def test_the_checks_see_lazy_entries_and_the_root_package(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('from pdserve import __version__\nfrom pdserve import web\n'
                      'X = {"a": "pdserve.transfer.tp:follower_transfer", "b": "not pdserve.x:y"}\n')
    assert _imports(module) == {PACKAGE, "web", "transfer"}


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
    from pdserve.model.attention.base import ATTENTION_BACKENDS
    from pdserve.model.models.registry import MODELS
    from pdserve.router.policies import POLICIES
    from pdserve.serve import ROLES
    from pdserve.transfer.base import TRANSFER_BACKENDS

    assert ROLES.names() == tuple(sorted(Role.names())) == ("decode", "null", "prefill")  # one role, one class
    for name in ROLES.names():
        assert ROLES.get(name).__name__.endswith("Role")
    assert ATTENTION_BACKENDS.get("torch").__name__ == "TorchAttention"
    assert {MODELS.get(a).__name__ for a in MODELS.names()} == {"CausalLM"}
    assert POLICIES.names() == ("cache_aware", "power_of_two", "random", "round_robin")
    assert TRANSFER_BACKENDS.get("nixl").__name__ == "NixlAgent"


def test_named_choices_are_registries() -> None:
    """Datasets, built-in models and every CLI's subcommands are registries too."""
    from pdserve.benchmarks import serving_cost
    from pdserve.benchmarks.datasets import DATASETS
    from pdserve.cli import SUBCOMMANDS
    from pdserve.model import builtin

    for registry in (DATASETS, builtin.PRESETS, builtin.COMMANDS, SUBCOMMANDS, serving_cost.COMMANDS):
        assert isinstance(registry, Registry) and registry.names()
    with pytest.raises(UnknownName, match="unknown dataset 'nope'; known: random, "):
        DATASETS.get("nope")


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
