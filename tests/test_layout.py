"""The floors and rooms of the source tree, checked from the imports each module states.

kernels <- patterns <- server (nothing imports upward); kernels and patterns never import vLLM
or transformers (they must run on a GPU machine with only torch and triton); inside ``server/``
the plugin room never imports the commands room, and no server module imports ``loadtests``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT).with_suffix("")
    package = ["headwise", *rel.parts[:-1]] if rel.parts[0] in ("kernels", "patterns", "server", "loadtests", "evals") \
        else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


# (folder, forbidden import prefixes, why)
RULES = [
    ("kernels", ("headwise.patterns", "headwise.server", "vllm", "transformers"), "the lowest floor"),
    ("patterns", ("headwise.server", "vllm", "transformers"), "above kernels, below server; runs without vLLM"),
    ("server/plugin", ("headwise.server.commands", "headwise.loadtests"), "the plugin room never imports a command"),
    ("server/commands", ("headwise.loadtests",), "loadtests join the CLI through an entry point"),
    ("server", ("headwise.evals",), "the eval suite joins the CLI through an entry point"),
]


@pytest.mark.parametrize("folder,forbidden,why", RULES, ids=[r[0] for r in RULES])
def test_imports_respect_the_floors(folder, forbidden, why):
    bad = []
    for path in _modules(folder):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, f"{folder} ({why}):\n" + "\n".join(bad)


def test_server_root_holds_only_shared_modules():
    """Every server module belongs to a room; only the package marker and ``env`` sit at the top."""
    top = sorted(p.name for p in (ROOT / "server").glob("*.py"))
    assert top == ["__init__.py", "env.py"], top


def test_headwise_environment_is_read_in_one_module():
    """``HEADWISE_*`` names are spelled out in ``server/env.py`` only (kernels' debug switch aside)."""
    offenders = []
    for folder in ("server", "loadtests", "patterns"):
        for path in _modules(folder):
            if path.name == "env.py":
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if '"HEADWISE_' in code or "'HEADWISE_" in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(["headwise", *(p for p in rel.parts if p != "__init__")])


def _module_edges(path: Path, modules: set[str]) -> set[str]:
    """The headwise modules ``path`` imports: ``from P import x`` goes to ``P.x`` when that is a
    module, else to ``P`` (so ``from . import x`` inside a package is no edge to the package)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_module_imports_itself_back():
    """No import circle among headwise's modules (lazy imports inside functions included): a circle
    means two files are one piece of code cut in the wrong place; shared names go to a module below
    both."""
    paths = {_module_name(p): p for f in ("kernels", "patterns", "server", "loadtests", "evals") for p in _modules(f)}
    graph = {m: _module_edges(p, set(paths)) for m, p in paths.items()}
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))
