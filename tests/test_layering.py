"""The package's import structure, read from the source (ast): no module uses
another module's underscore names, and imports follow the layers.

Layers, lowest first (docs/architecture.md draws them):

0. ``solvers`` (Krylov methods, preconditioners, the config object): torch
   only, never OT code; ``otlinop._checks`` (argument validation).
1. ``otlinop.kernels``: the streaming Triton kernels and their torch references.
2. operators: ``otlinop._base`` and the modules that build operators.
3. algorithms: Sinkhorn, the loss, gradients and HVPs.
4. the public surface and its users: ``otlinop/__init__.py`` and
   ``otlinop.solvers`` (the re-export of ``solvers``) assemble it;
   ``otlinop.bench`` and the demo (``python -m otlinop``) use it.

A module may import from its own layer and the layers below, never above.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("otlinop", "solvers")

#: Module-name prefixes -> layer. The longest matching prefix wins; every
#: module of the two packages must match one (a new module must be placed).
LAYERS = {
    "solvers": 0,
    "otlinop._checks": 0,
    "otlinop._measure_flags": 0,   # the checks' one-launch kernel
    "otlinop.kernels": 1,
    "otlinop._base": 2,
    "otlinop._interop": 2,
    "otlinop._operators": 2,
    "otlinop.plan": 2,
    "otlinop.marginals": 2,
    "otlinop.truncated": 2,
    "otlinop.hessian": 2,
    "otlinop.multiscale": 2,
    "otlinop.sinkhorn": 3,
    "otlinop._sinkhorn": 3,
    "otlinop.loss": 3,
    "otlinop._loss": 3,
    "otlinop._call_graphs": 3,   # whole loss calls as CUDA graphs
    "otlinop.hvp": 3,
    "otlinop.distributed": 3,  # composes operators over a process group
    "otlinop._demo": 4,
    "otlinop.__main__": 4,
    "otlinop.bench": 4,
    "otlinop.solvers": 4,
    "otlinop": 4,            # otlinop/__init__.py only (other modules match a longer prefix)
}


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            yield ".".join(parts), path, is_package


MODULES = list(_modules())


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        # "otlinop._sinkhorn" places otlinop._sinkhorn_loops too (private modules of one idea).
        matches = module == prefix or module.startswith((prefix + ".", prefix + "_"))
        if matches and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import`` statement."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: pathlib.Path, is_package: bool):
    """``(line, imported module, imported names, module aliases)`` of every import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, [], [alias.asname or alias.name.split(".")[0]]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            yield node.lineno, target, [a.name for a in node.names], []


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


@pytest.mark.parametrize("module, path, is_package", MODULES, ids=[m for m, _, _ in MODULES])
def test_no_private_names_across_modules(module, path, is_package):
    """``from x import _y`` is refused for any of our modules, private modules
    included (``from . import _common``); so is ``import pkg._mod``."""
    bad = []
    for line, target, names, _ in _imports(module, path, is_package):
        if target == "__future__" or not _ours(target):
            continue
        bad += [f"{path.name}:{line}: from {target} import {n}" for n in names
                if n.startswith("_") and not n.startswith("__")]
        if not names and any(part.startswith("_") for part in target.split(".")):
            bad.append(f"{path.name}:{line}: import {target}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, path, is_package", MODULES, ids=[m for m, _, _ in MODULES])
def test_no_underscore_attributes_of_other_modules(module, path, is_package):
    """``mod._name`` on a module imported by name (``import solvers``) is a private
    import in disguise."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            if _ours(target):
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    if any(m == candidate for m, _, _ in MODULES):
                        aliases[alias.asname or alias.name] = candidate
    bad = [f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
           if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
           and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not bad, "underscore attributes of other modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, path, is_package", MODULES, ids=[m for m, _, _ in MODULES])
def test_imports_follow_the_layers(module, path, is_package):
    layer = _layer(module)
    assert layer is not None, f"{module} is in no layer: place it in tests/test_layering.py's LAYERS"
    bad = []
    for line, target, names, _ in _imports(module, path, is_package):
        if not _ours(target):
            continue
        if module.startswith("solvers") and target.startswith("otlinop"):
            bad.append(f"{path.name}:{line}: solvers imports OT code ({target})")
            continue
        # ``from pkg import submodule`` imports the submodule.
        targets = [f"{target}.{n}" if _layer(f"{target}.{n}") is not None and f"{target}.{n}" in
                   {m for m, _, _ in MODULES} else target for n in names] or [target]
        for t in targets:
            t_layer = _layer(t)
            if t_layer is not None and t_layer > layer:
                bad.append(f"{path.name}:{line}: layer {layer} ({module}) imports layer {t_layer} ({t})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_module_is_checked():
    """The walk finds the packages' modules (a test that checks nothing cannot pass)."""
    names = {m for m, _, _ in MODULES}
    assert {"otlinop", "otlinop.kernels", "otlinop.plan", "solvers", "solvers.cg"} <= names
    assert len(names) > 40


def test_the_checks_find_what_they_forbid(tmp_path):
    """The parser flags a private import, a private attribute and an upward import."""
    sample = tmp_path / "plan.py"
    sample.write_text("from . import _common\nfrom .sinkhorn import sinkhorn\nimport solvers\nsolvers._loop\n")
    bad = [n for _, t, names, _ in _imports("otlinop.plan", sample, False) for n in names if n.startswith("_")]
    assert bad == ["_common"]
    targets = [t for _, t, _, _ in _imports("otlinop.plan", sample, False)]
    assert "otlinop.sinkhorn" in targets and _layer("otlinop.sinkhorn") > _layer("otlinop.plan")
