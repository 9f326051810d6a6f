"""The house rules a reader relies on, checked on the source itself.

Every multi-line docstring opens with a one-line summary; each file keeps within its line budget; the
scripts on top stay few and independent; `util/` stays plumbing under `model.py`; and `knn.py` loads no
run plumbing (locks, signals, requeue).
"""
import ast
import os
import subprocess

from conftest import ROOT

# Lines per file (`wc -l`); a file that grows past its budget is split by topic or said more briefly.
BUDGETS = {"model.py": 410, "recipe.py": 110, "refine.py": 450, "pretrain.py": 300, "finetune.py": 160,
           "knn.py": 150, "probe.py": 290, "cluster.py": 170, "demo.py": 300, "util/resume.py": 330,
           "util/features.py": 180, "util/common.py": 220, "util/data.py": 210, "util/views.py": 150,
           "util/digits.py": 70, "tools/bench.py": 720, "README.md": 250}
UTIL_BUDGET = 250
MAX_SCRIPTS = 10
SHARED_SCRIPTS = {"model", "recipe"}  # the only top-level modules another script may import


def tracked_python_files() -> list[str]:
    """The repository's .py files, relative to its root: git's list, or a walk where git is missing."""
    try:
        out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
        files = out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "runs"]
            files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names if n.endswith(".py")]
    return sorted(f for f in files if os.path.exists(os.path.join(ROOT, f)))


def parse(path: str) -> ast.Module:
    with open(os.path.join(ROOT, path)) as f:
        return ast.parse(f.read(), filename=path)


def line_count(path: str) -> int:
    with open(os.path.join(ROOT, path)) as f:
        return sum(1 for _ in f)


def summary_offence(doc: str) -> str | None:
    """Why a multi-line docstring lacks a one-line summary, or None when it has one (or is one line)."""
    lines = doc.splitlines()
    if len(lines) < 2:
        return None
    if not lines[0].strip().endswith("."):
        return "the first line is not a sentence ending with '.'"
    if lines[1].strip():
        return "no blank line after the first"
    return None


def test_summary_offence_tells_a_summary_from_a_wrapped_sentence():
    assert summary_offence("One line.") is None
    assert summary_offence("Summary.\n\nMore text\nover lines.") is None
    assert summary_offence("A sentence that wraps\nonto a second line.") is not None
    assert summary_offence("First sentence. Second sentence\nwrapped.") is not None
    assert summary_offence("Summary.\nNo blank line.") is not None


def test_every_multi_line_docstring_opens_with_a_one_line_summary():
    offenders = []
    for path in tracked_python_files():
        tree = parse(path)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            why = doc and summary_offence(doc)
            if why:
                offenders.append(f"{path}:{node.body[0].lineno}: {why}")
    assert not offenders, f"{len(offenders)} docstrings without a one-line summary:\n" + "\n".join(offenders)


def test_every_file_keeps_within_its_line_budget():
    budgets = dict(BUDGETS)
    for path in tracked_python_files():
        if path.startswith("util/"):
            budgets.setdefault(path, UTIL_BUDGET)
    over = {p: (line_count(p), b) for p, b in budgets.items()
            if os.path.exists(os.path.join(ROOT, p)) and line_count(p) > b}
    assert not over, "over budget (lines, budget): " + ", ".join(f"{p} {n} > {b}" for p, (n, b) in over.items())
    scripts = [p for p in tracked_python_files() if "/" not in p]
    assert len(scripts) <= MAX_SCRIPTS, scripts


def project_imports(path: str, top_level: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it, as paths: 'model.py', 'util/data.py'."""
    found = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from util import data` names a module; `from util.data import x` names its members.
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "util" else [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in top_level:
                found.add(parts[0] + ".py")
            elif parts[0] == "util" and len(parts) > 1:
                found.add(f"util/{parts[1]}.py")
    return found


def test_scripts_stay_independent_and_util_stays_under_the_model():
    files = tracked_python_files()
    top_level = {p[:-3] for p in files if "/" not in p}
    allowed = {m + ".py" for m in SHARED_SCRIPTS}
    for path in files:
        scripts = {p for p in project_imports(path, top_level) if "/" not in p}
        if "/" not in path:
            assert scripts <= allowed, f"{path} imports the scripts {sorted(scripts - allowed)}"
        elif path.startswith("util/"):
            assert scripts <= {"model.py"}, f"{path} imports the scripts {sorted(scripts - {'model.py'})}"


def test_knn_loads_the_model_and_at_most_four_util_files():
    top_level = {p[:-3] for p in tracked_python_files() if "/" not in p}
    closure, todo = set(), ["knn.py"]
    while todo:
        for module in project_imports(todo.pop(), top_level) - closure:
            closure.add(module)
            todo.append(module)
    closure.discard("knn.py")
    util = {p for p in closure if p.startswith("util/")}
    assert closure - util == {"model.py"} and len(util) <= 4, sorted(closure)
    assert "util/resume.py" not in closure
