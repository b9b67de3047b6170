"""
The shape of the repository a reader relies on: imports point one way (no cycle anywhere, the model files
import no command-line, distributed or Hugging Face code), and every command the README and docs/ show
names a script, tool or config that exists.
"""
import ast
import re

from conftest import REPO

TOP_LEVEL = {"model.py", "moe_model.py", "train.py", "sample.py", "prepare.py"}


def our_modules():
    """{module name: path} of every Python file of the repository but the tests."""
    paths = [REPO / name for name in TOP_LEVEL] + sorted((REPO / "nanomoe").rglob("*.py")) \
        + sorted((REPO / "tools").glob("*.py"))
    names = {}
    for p in paths:
        parts = p.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return names


def imports_of(path, modules):
    """The modules of ours that path imports, at the top or inside a function (both run sooner or later)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from nanomoe.hf import llama` imports nanomoe.hf.llama; `from model import GPT` imports model
            candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in modules)
    return found


def import_graph():
    modules = our_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30, sorted(graph)  # the walk found the package and the tools
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_model_files_import_only_layers_settings_and_errors():
    """model.py names no MoE, command-line or distributed code; moe_model.py adds only the dense model."""
    graph = import_graph()
    allowed = lambda m: m.startswith("nanomoe.layers") or m in ("nanomoe.settings", "nanomoe.errors")  # noqa: E731
    assert all(allowed(m) for m in graph["model"]), graph["model"]
    assert all(allowed(m) or m == "model" for m in graph["moe_model"]), graph["moe_model"]
    library = [m for m in graph if m.startswith("nanomoe")]
    assert not [m for m in library if graph[m] & ({"train", "sample", "prepare"} | {t for t in graph
                                                                                   if t.startswith("tools")})]


def test_commands_in_the_docs_name_what_exists():
    """`python X.py`, `python -m tools.X` and config/X.py in README.md and docs/*.md all exist."""
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    missing = []
    for path in texts:
        text = path.read_text()
        for script in re.findall(r"python (\w+\.py)\b", text):
            if not (REPO / script).is_file():
                missing.append(f"{path.name}: python {script}")
        for tool in re.findall(r"-m (tools\.\w+)", text):
            if not (REPO / (tool.replace(".", "/") + ".py")).is_file():
                missing.append(f"{path.name}: -m {tool}")
        for config in re.findall(r"\bconfig/(\w+\.py)", text):
            if not (REPO / "config" / config).is_file():
                missing.append(f"{path.name}: config/{config}")
    assert not missing, missing
