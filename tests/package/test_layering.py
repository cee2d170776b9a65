"""The package's import layering (DESIGN: imports point downward only) and no import cycles.

Every ``import`` statement counts, also those deferred into functions: a deferred import of a
higher layer is still a dependency on it."""

from __future__ import annotations

import ast
from pathlib import Path

import unireg

SRC = Path(unireg.__file__).resolve().parent

# lowest first; a module may import its own layer's package and any layer below
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("cpu",),  # the C library's and the machine's settings, imports nothing of unireg
    ("unireg", "profiling", "demo_data"),
    ("spatial",),
    ("io",),
    ("result", "losses"),
    ("metrics", "quality", "data", "nets"),
    ("solvers",),
    ("training",),
    ("methods",),
    ("evaluation", "report", "viewer"),
    ("cli",),
    ("__main__",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The unireg modules a file imports (statically, anywhere in it)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "unireg"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "unireg":
                found.add(node.module)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "unireg"


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def test_every_import_points_down_the_layers() -> None:
    graph = _graph()
    assert set(map(_layer, graph)) <= set(RANK), "a new top-level module needs a layer here"
    wrong = []
    for module, targets in graph.items():
        src = _layer(module)
        for target in targets:
            dst = _layer(target)
            if dst == "unireg" or dst == src:
                continue
            if RANK[dst] >= RANK[src]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_two_modules_import_each_other() -> None:
    graph = _graph()
    cycles = []

    def resolve(target: str) -> str | None:
        # "from unireg.x import y" may name a module x.y or an attribute of x
        return target if target in graph else None

    edges = {m: {t for t in map(resolve, ts) if t and t != m} for m, ts in graph.items()}
    # a package's __init__ may be imported by its own submodules: count only edges that
    # reach back from the package to the submodule
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_registry_and_the_cli_parser_import_no_torch_or_numpy() -> None:
    import subprocess
    import sys

    from unireg.cli import VERBS

    code = (
        "import sys\nfrom unireg.cli import main\n"
        "for argv in ([], *[[v, '--help'] for v in sys.argv[1:]], ['--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'scipy', 'nibabel') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *VERBS], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert "HEAVY []" in out.stderr, out.stderr[-500:]
