"""The package's architecture as docs/design.md draws it, held by tests.

* no import circle between mergekit_tada's modules, type-only and
  function-level imports included;
* every import points down the layers: entry points -> run -> methods ->
  training/probe -> maths and I/O;
* no module over 500 lines (the design aims at ~450: one idea a file);
* the "Adding a method" recipe works: a method file, one registry line, and
  the stock merge runs it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import mergekit_tada

PACKAGE = Path(mergekit_tada.__file__).parent
LAYERS = (  # lowest first; a module belongs to the first prefix that matches
    ("entry", ("cli", "api", "fastpath", "_hook", "integration", "retrieval")),
    ("run", ("run",)),
    ("methods", ("methods",)),
    ("training", ("training",)),
    ("probe", ("probe",)),
)
ORDER = ["io", "probe", "training", "methods", "run", "entry"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its text."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found = [t for t in targets if t in modules]
            graph[name].update(found[:1] if found else [])
            for t in found:
                if t != base:  # 'from pkg import module': the module itself
                    graph[name].add(t)
        graph[name].discard(name)
    return graph


def layer(module: str) -> str:
    short = module.removeprefix("mergekit_tada").lstrip(".")
    if short == "":
        return "entry"  # the package's lazy `merge`
    for name, prefixes in LAYERS:
        if short.split(".")[0] in prefixes:
            return name
    return "io"


def test_no_import_circle():
    graph = imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_point_down_the_layers():
    upward = [
        f"{a} ({layer(a)}) -> {b} ({layer(b)})"
        for a, targets in imports().items()
        for b in targets
        if ORDER.index(layer(b)) > ORDER.index(layer(a))
    ]
    assert not upward, upward


def test_no_module_is_long():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, long


def test_adding_a_method(work, monkeypatch):
    """docs/design.md's recipe: a method (here the mean of the updates, a toy),
    one line in the registry, and the stock merge path runs it."""
    from mergekit.merge_methods import registry as mergekit_registry

    from mergekit_tada import integration
    from mergekit_tada.lowrank import stack, svd
    from mergekit_tada.methods import registry
    from mergekit_tada.methods.base import WEIGHT, FamilyMethod, family_spec

    class LoraMean(FamilyMethod):
        spec = family_spec("lora_mean_recipe", "mean of the updates", (WEIGHT,))

        def combine(self, job, updates):
            present = [u for u in updates.values() if u is not None]
            return svd(stack(present, [1 / len(updates)] * len(present))), {}

    monkeypatch.setattr(registry, "METHODS", (*registry.METHODS, LoraMean()))
    monkeypatch.setattr(
        registry, "METHOD_NAMES", registry.METHOD_NAMES | {"lora_mean_recipe"}
    )
    integration.register_all()
    try:
        config = {
            "merge_method": "lora_mean_recipe",
            "base_model": "./base",
            "models": [
                {"model": "./base+./lora-task"},
                {"model": "./base+./lora-domain"},
            ],
            "parameters": {"rank": 10},
            "dtype": "float32",
        }
        out = Path(mergekit_tada.merge(config, "out", quiet=True))
    finally:
        mergekit_registry._METHODS.pop("lora_mean_recipe", None)
    from conftest import adapter_delta, load_weights, peft_delta, rel_err

    task, domain = peft_delta("base", "lora-task"), peft_delta("base", "lora-domain")
    merged = adapter_delta(out / "adapter")
    base, written = load_weights("base"), load_weights(out)
    assert merged
    for name in set(task) | set(domain):
        expected = 0.5 * (task.get(name, 0) + domain.get(name, 0))
        assert rel_err(merged[name], expected) < 1e-5, name
        assert rel_err(written[name].double() - base[name].double(), expected) < 1e-5
    report = json.loads((out / "merge_report.json").read_text())
    assert report["settings"]["merge_method"] == "lora_mean_recipe"
    assert torch.isfinite(written[name]).all()
