"""Packaging: kernels/ is installed as lopfast.kernels, from a real (non-editable) install."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_installed_copy_has_kernels_subpackage(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, cwd=tmp_path, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert (target / "lopfast" / "kernels" / "__init__.py").exists()
    code = (
        "import lopfast, lopfast.kernels, lopfast.layers;"
        "print(lopfast.kernels.__file__);"
        "print(lopfast.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    ).stdout.split()
    assert all(line.startswith(str(target)) for line in out), out


def test_works_without_triton_and_says_so_only_when_asked():
    # triton is optional: with it missing, lopfast imports quietly, runs the reference, and a
    # forced triton backend is a clear error
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lopfast, torch.nn as nn\n"
        "m = lopfast.expand(nn.Conv2d(3, 4, 3))\n"
        "assert m(torch.randn(1, 3, 5, 5)).shape == (1, 4, 3, 3)\n"
        "assert torch.isfinite(lopfast.sp_loss(torch.randn(4, 3), torch.randn(4, 5)))\n"
        "try:\n"
        "    lopfast.sp_loss(torch.randn(4, 3), torch.randn(4, 5), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('forced triton without triton did not fail')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Triton not available" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- layering
# Data flows one way: cli -> pipeline -> prune -> distill -> surgery/io/fastpath -> layers -> ops
# -> backend/dispatch/graphs -> kernels. A module may import its own layer or lower ones (function-level lazy
# imports included); the root package (the public facade) and the commands sit on top.
_LAYERS = [
    ("lopfast.kernels", "lopfast._build_flags", "lopfast.ops._precision", "lopfast.checks", "lopfast.files"),
    ("lopfast.backend", "lopfast.dispatch", "lopfast.graphs"),
    ("lopfast.ops",),
    ("lopfast.layers",),
    ("lopfast.surgery", "lopfast.fastpath", "lopfast.io"),
    ("lopfast.distill",),
    ("lopfast.prune",),
    ("lopfast.pipeline",),
    ("lopfast.selfcheck", "lopfast.cli", "lopfast"),
]
# (importer, imported, why) exceptions
_ALLOWED_UP = set()


def _modules():
    import ast

    mods = {}
    for p in [*(ROOT / "lopfast").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["lopfast", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = (p, ast.parse(p.read_text()), p.name == "__init__.py")
    return mods


def _imports(name, tree, is_pkg, mods, top_level_only):
    """lopfast modules that ``name`` imports (the module itself for ``from pkg import name``)."""
    import ast

    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods or a.name == "_C" else prefix
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("kernels"):
                t = "lopfast." + t
            if t == "lopfast._C" or not t.startswith("lopfast"):
                continue  # the compiled extension, or not ours
            while t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            if t != name:
                out.add(t)
    return out


def _rank(name):
    best = None
    for i, prefixes in enumerate(_LAYERS):
        for pre in prefixes:
            if name == pre or name.startswith(pre + "."):
                if best is None or len(pre) > best[1]:
                    best = (i, len(pre))
    assert best is not None, f"{name} is in no layer of tests/test_package.py::_LAYERS"
    return best[0]


def test_no_module_imports_a_layer_above_it():
    mods = _modules()
    bad = []
    for name, (_, tree, is_pkg) in mods.items():
        for dep in _imports(name, tree, is_pkg, mods, top_level_only=False):
            if _rank(dep) > _rank(name) and (name, dep) not in _ALLOWED_UP:
                bad.append(f"{name} imports {dep}")
    assert not bad, bad


def test_no_import_circles_at_module_level():
    # lazy (function-level) imports may point back; module-level ones must form no cycle.
    # A package importing its own submodules is not a circle (Python binds them as it goes).
    mods = _modules()
    graph = {n: {d for d in _imports(n, t, pkg, mods, top_level_only=True)
                 if not (d != n and n.startswith(d + ".")) or d == "lopfast"}
             for n, (_, t, pkg) in mods.items()}
    graph = {n: {d for d in deps if (n, d) not in _ALLOWED_UP} for n, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_layering_check_catches_an_upward_import_and_a_circle():
    import ast

    mods = {"lopfast.ops.x": None, "lopfast.layers.y": None, "lopfast.ops": None, "lopfast.layers": None}
    tree = ast.parse("import torch\nfrom lopfast.layers.y import Z\ndef f():\n    from lopfast import layers\n")
    assert _imports("lopfast.ops.x", tree, False, mods, top_level_only=False) == {"lopfast.layers.y", "lopfast.layers"}
    assert _imports("lopfast.ops.x", tree, False, mods, top_level_only=True) == {"lopfast.layers.y"}
    assert _rank("lopfast.layers.y") > _rank("lopfast.ops.x")
    assert _rank("lopfast.ops._precision") < _rank("lopfast.backend") == _rank("lopfast.dispatch") < _rank("lopfast.ops.collapse")
