"""The course tools: tools/make_assignment.py, tools/grade.py and tools/selfcheck_assignment.py.

The marker parsing and its one-line errors, the student and solution copies, idempotence, the grade's schema,
the CI self-check."""
import importlib.util
import os
import subprocess
import sys

import grade
import make_assignment as ma
import pytest
import selfcheck_assignment
from conftest import ROOT

S = "SOLUTION"  # the marker words spelt apart, so that this file holds no marker itself
BEGIN, END, P_BEGIN, P_END = f"# BEGIN {S} task=", f"# END {S}", "# BEGIN PROMPT", "# END PROMPT"

GOOD = f"""def add(a, b):
    \"\"\"Eq. (3) of docs/METHOD.md: the sum.\"\"\"
    {P_BEGIN}
    # a plus b
    {P_END}
    {BEGIN}1
    s = a + b
    return s
    {END}


def scale(xs, k):
    for i in range(len(xs)):
        xs[i] = xs[i] * k  # {S} task=2
    return xs
"""


def write_tree(root, files):
    for path, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, path)) or root, exist_ok=True)
        with open(os.path.join(root, path), "w") as f:
            f.write(text)
    return str(root)


def read(path):
    with open(path) as f:
        return f.read()


def test_student_and_solution_copies(tmp_path):
    root = write_tree(tmp_path / "repo", {"calc.py": GOOD, "notes.md": "no code\n"})
    assert ma.main(["--root", root, "--out", str(tmp_path / "a")]) == 0
    student, solution = read(tmp_path / "a/student/calc.py"), read(tmp_path / "a/solution/calc.py")
    want = '    # a plus b\n    raise NotImplementedError("task 1: write add, Eq. (3) of docs/METHOD.md")\n\n'
    assert want in student, student
    assert '        raise NotImplementedError("task 2: write scale")\n    return xs' in student
    assert "s = a + b" not in student and S not in student and "PROMPT" not in student
    assert solution == GOOD.replace(f"    {P_BEGIN}\n    # a plus b\n    {P_END}\n    {BEGIN}1\n", "") \
        .replace(f"    {END}\n", "").replace(f"  # {S} task=2", "")
    assert read(tmp_path / "a/student/notes.md") == "no code\n"
    spec = importlib.util.spec_from_file_location("calc_solution", tmp_path / "a/solution/calc.py")
    calc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calc)
    assert calc.add(2, 3) == 5 and calc.scale([1, 2], 3) == [3, 6]


def test_idempotent(tmp_path):
    root = write_tree(tmp_path / "repo", {"calc.py": GOOD})
    ma.make(root, str(tmp_path / "a"))
    ma.make(str(tmp_path / "a/solution"), str(tmp_path / "b"))
    for copy in ("student", "solution"):
        assert read(tmp_path / f"b/{copy}/calc.py") == read(tmp_path / "a/solution/calc.py")


def test_repository_copies_compile_and_are_idempotent():
    """Every marked file of this repository renders: the student copy compiles, the solution is the source.

    The solution rendering has no marker left and equals the file with the marker lines dropped."""
    marked = ma.collect(ROOT, ma.tracked_files(ROOT))
    assert len(ma.tasks_of(marked)) >= 10
    for path, (text, regions) in marked.items():
        compile(ma.render(text, regions, ()), path, "exec")
        solution = ma.render(text, regions, {r["task"] for r in regions})
        assert ma.parse(solution, path) == [] and ma.render(solution, [], ()) == solution
        compile(solution, path, "exec")


BAD = {
    "nested": (f"def f():\n    {BEGIN}1\n    {BEGIN}2\n    x = 1\n    {END}\n    {END}\n", "m.py:3: nested"),
    "end without begin": (f"def f():\n    x = 1\n    {END}\n", "m.py:3: END"),
    "never closed": (f"def f():\n    {BEGIN}1\n    x = 1\n", "m.py:2: BEGIN SOLUTION block never closed"),
    "misspelt": (f"def f():\n    # BEGIN {S} task 1\n    x = 1\n    {END}\n", "m.py:2: unknown marker"),
    "lower case": (f"def f():\n    # begin {S.lower()} task=1\n", "m.py:2: unknown marker"),
    "prompt alone": (f"def f():\n    {P_BEGIN}\n    # hint\n    {P_END}\n    x = 1\n", "m.py:5: a PROMPT"),
    "task in two functions": (f"def f():\n    x = 1  # {S} task=4\n\n\ndef g():\n    y = 2  # {S} task=4\n",
                              "m.py:6: task 4 is already used in another function (m.py:2)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_marker_errors_are_one_line(tmp_path, capsys, case):
    text, want = BAD[case]
    root = write_tree(tmp_path / "repo", {"m.py": text})
    assert ma.main(["--root", root, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {want}") and err.count("\n") == 1, err


def test_cli_error_exit_2_without_traceback(tmp_path):
    root = write_tree(tmp_path / "repo", {"m.py": BAD["nested"][0]})
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_assignment.py"), "--root", root,
                        "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: m.py:3: nested") and "Traceback" not in r.stderr


def test_grade_schema():
    points = {"task1": {"points": 2, "function": "f", "equation": "Eq. (1)"}, "task2": {"points": 1}}
    tests = [dict(nodeid="t.py::test_a", task=1, passed=True, why="passed"),
             dict(nodeid="t.py::test_b", task=1, passed=False, why="not done: task 1: ..."),
             dict(nodeid="t.py::test_c", task=2, passed=True, why="passed")]
    r = grade.grade(points, tests)
    assert r["score"] == 1 and [t["score"] for t in r["tests"]] == [0, 1]  # task 1: one of two tests fails
    assert all(set(t) == {"name", "score", "max_score", "output"} for t in r["tests"])
    assert r["tests"][0]["max_score"] == 2 and "test_b: not done" in r["tests"][0]["output"]


def test_pytest_marker_selects_one_task():
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "task3", "-W", "error",
                        os.path.join("tests", "test_tasks.py")], cwd=ROOT, capture_output=True, text=True)
    picked = [ln for ln in r.stdout.splitlines() if "::" in ln]
    assert r.returncode == 0 and picked and all("test_queue_lookup" in ln for ln in picked), r.stdout + r.stderr


def test_selfcheck(tmp_path):
    """The CI self-check of the repository's own assignment (tools/selfcheck_assignment.py)."""
    assert selfcheck_assignment.check(str(tmp_path)) == []
