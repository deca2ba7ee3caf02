"""Import structure: no cycles between fastlb's modules; a worker loads no supervisor part."""
import ast
import pathlib
import subprocess
import sys

import fastlb

ROOT = pathlib.Path(fastlb.__file__).parent


def module_graph():
    """fastlb module -> the fastlb modules it imports at module level (not inside functions)."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("fastlb", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("fastlb")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastlb"):
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = module_graph()
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_the_worker_process_loads_no_supervisor_part():
    code = ("import sys, fastlb.worker; "
            "print(sorted(m for m in sys.modules if m.startswith(('fastlb.supervisor', 'fastlb.admin', "
            "'fastlb.registry', 'fastlb.health', 'fastlb.statefile', 'fastlb.pool', 'fastlb.handlers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
