"""The package's shape: imports flow one way (cli -> sweep, cluster, perf, report, studies, forecast ->
runner ->
executors -> prepare -> data, models, measurement, records, checkpoints -> methods) and no module imports
one that imports it back."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [  # lowest first; a module may import only from its own layer or below
    ["methods"],
    [
        "bench.config",
        "bench.records",
        "bench.checkpoint",
        "bench.schedule",
        "bench.data",
        "bench.models",
        "bench.measure",
    ],
    ["bench.prepare"],
    ["bench.executors"],
    ["bench.runner"],
    [
        "bench.sweep",
        "bench.cluster",
        "bench.perf",
        "bench.report",
        "bench.studies",
        "bench.forecast",
    ],
    ["bench.cli", "bench.__main__", "bench"],
]


def module_names() -> dict[str, Path]:
    out = {}
    for package in ("bench", "methods"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """Project modules that ``name`` imports anywhere in its body (lazy imports too), with
    the packages Python imports on the way."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module and the packages above it
                candidate = ".".join(parts[:i])
                if (
                    candidate in known
                    and not name.startswith(candidate + ".")
                    and candidate != name
                ):
                    found.add(candidate)
    return found


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    best = max(
        (
            prefix
            for level in LAYERS
            for prefix in level
            if name == prefix or name.startswith(prefix + ".")
        ),
        key=len,
    )
    return next(i for i, level in enumerate(LAYERS) if best in level)


def test_the_import_graph_is_read_from_the_sources():
    edges = graph()
    assert "bench.executors.sequential" in edges["bench.runner"]
    assert "bench.prepare" in edges["bench.executors.distributed"]
    assert "bench.models.split" in edges["bench.prepare"]
    assert "bench.data.tasks" in edges["bench.data.text"]  # a lazy, relative import


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_imports_flow_down_the_layers():
    upward = [
        f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer(b) > layer(a)
    ]
    assert not upward, "imports against the layering: " + ", ".join(sorted(upward))


def test_every_bench_module_sits_in_a_sub_package_or_the_top_few():
    top = {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert top == {
        "__init__",
        "__main__",
        "checkpoint",
        "cli",
        "config",
        "prepare",
        "records",
        "runner",
        "schedule",
        "sweep",
    }


#: packages whose subject is a named rule (a study of DNI, the benchmark's chosen contenders),
#: as a spec in bench/experiments names its rules
ABOUT_NAMED_RULES = ("bench/studies", "bench/perf")


def test_bench_holds_no_rule_name():
    """Every per-rule fact lives on the rule's declaration in methods/: no string in bench/
    (its studies and benchmark aside) is a rule's name."""
    import methods

    names = set(methods.METHODS)
    found = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        if where.startswith(ABOUT_NAMED_RULES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{where}:{node.lineno}: {node.value!r}")
    assert not found, "rule names outside methods/:\n" + "\n".join(found)
