"""Check that the course assignment tools/make_assignment.py writes is gradeable, task by task.

    python tools/selfcheck_assignment.py

It builds the assignment in a temporary folder and runs tests/test_tasks.py's tests (plain functions,
called directly, in this one process: the project's modules are re-imported from each copy) to check that
- the solution copy passes every task's tests;
- in the student copy, each test fails with the NotImplementedError of its own task (so the copy imports,
  and no test reaches another task's body);
- the student copy with one task's solution restored passes that task's tests, for every task.
Prints one line per check and exits 1 listing what failed.
"""
import importlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_assignment as ma  # noqa: E402  (the folder of this file, then the module)

ROOT = ma.ROOT


def project_modules(copy):
    """Top-level module and package names of a copy, to be dropped from sys.modules before re-importing."""
    return {n[:-3] for n in os.listdir(copy) if n.endswith(".py")} | \
        {n for n in os.listdir(copy) if os.path.isfile(os.path.join(copy, n, "__init__.py"))} | {"test_tasks"}


def run_tests(copy):
    """{test name: (task, None or the exception it raised)} of copy/tests/test_tasks.py, imported afresh."""
    names = project_modules(copy)
    before = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] in names}
    saved = list(sys.path)
    sys.path[:0] = [copy, os.path.join(copy, "tests")]
    try:
        tests = importlib.import_module("test_tasks")
        results = {}
        for name, fn in vars(tests).items():
            marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "task"]
            if name.startswith("test_") and marks:
                try:
                    fn()
                    results[name] = (marks[0].args[0], None)
                except Exception as e:  # noqa: BLE001  (every failure is a finding to report)
                    results[name] = (marks[0].args[0], e)
        return results
    finally:  # the caller's modules back, so that a test session calling this sees no change
        sys.path[:] = saved
        for m in [m for m in sys.modules if m.split(".")[0] in names]:
            del sys.modules[m]
        sys.modules.update(before)


def check(out):
    """The list of failures (empty when all is well) of the assignment written into `out`."""
    files = [p for p in ma.tracked_files(ROOT) if p.endswith(".py")]  # what the tests import
    marked = ma.collect(ROOT, files)
    tasks = ma.tasks_of(marked)
    problems = []
    ma.write_copy(ROOT, files, marked, os.path.join(out, "solution"), solved=set(tasks))
    for name, (task, err) in run_tests(os.path.join(out, "solution")).items():
        if err is not None:
            problems.append(f"solution copy: {name} (task {task}) fails: {type(err).__name__}: {err}")
    print(f"solution copy: {len(tasks)} tasks checked")
    student = os.path.join(out, "student")
    ma.write_copy(ROOT, files, marked, student, solved=())
    seen = set()
    for name, (task, err) in run_tests(student).items():
        seen.add(task)
        if not (isinstance(err, NotImplementedError) and str(err).startswith(f"task {task}:")):
            problems.append(f"student copy: {name} (task {task}) should stop at task {task}'s NotImplementedError, "
                            f"got {type(err).__name__ if err else 'a pass'}: {err}")
    problems += [f"task {n} has no test in tests/test_tasks.py" for n in tasks if n not in seen]
    print(f"student copy: {len(seen)} tasks checked")
    for n in tasks:
        ma.write_copy(ROOT, list(marked), marked, student, solved={n})
        for name, (task, err) in run_tests(student).items():
            if task == n and err is not None:
                problems.append(f"student copy with task {n} restored: {name} fails: {type(err).__name__}: {err}")
    print(f"student copy with one task restored: {len(tasks)} tasks checked")
    return problems


def main():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        problems = check(out)
    for p in problems:
        print("FAIL", p)
    print(f"{'FAILED' if problems else 'ok'} in {time.time() - t0:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
