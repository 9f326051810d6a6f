"""Grade the course assignment: run tests/test_tasks.py once, print a score per task, write results.json.

    python tools/grade.py [--points grader/points.json] [--results results.json]

A task scores its points when all its tests pass and 0 otherwise; a test that stops at the task's
`raise NotImplementedError` is reported as "not done" rather than as wrong. results.json follows the
Gradescope autograder schema: {"score", "tests": [{"name", "score", "max_score", "output"}]}.
"""
import argparse
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Collect:
    """A pytest plugin that keeps, per test, its task, its outcome and a one-paragraph reason."""

    def __init__(self):
        self.tests = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.failed:
            task = next((m.args[0] for m in self.marks.get(report.nodeid, ()) if m.name == "task"), None)
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            if report.passed:
                why = "passed"
            elif "NotImplementedError" in str(report.longrepr):  # the task's own raise: not done, not wrong
                why = "not done: " + message.splitlines()[0]
            else:
                why = "failed: " + message
            self.tests.append(dict(nodeid=report.nodeid, task=task, passed=report.passed, why=why))

    def pytest_collection_modifyitems(self, items):
        self.marks = {item.nodeid: list(item.iter_markers()) for item in items}


def grade(points: dict, tests: list) -> dict:
    """The Gradescope result: one entry per task (all its tests must pass), total score."""
    entries = []
    for key, info in points.items():
        n = int(key.removeprefix("task"))
        mine = [t for t in tests if t["task"] == n]
        ok = bool(mine) and all(t["passed"] for t in mine)
        lines = [f"{t['nodeid'].split('::')[-1]}: {t['why']}" for t in mine] or ["no test ran"]
        name = f"task {n}: {info.get('function', '')} ({info.get('equation') or 'see docs/TEACHING.md'})"
        entries.append(dict(name=name, score=info["points"] if ok else 0, max_score=info["points"],
                            output="\n".join(lines)))
    return dict(score=sum(e["score"] for e in entries), tests=entries)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default=next((p for p in (os.path.join(ROOT, "tools", "points.json"),
                                                          os.path.join(ROOT, "points.json")) if os.path.exists(p)), ""),
                    help="points.json of tools/make_assignment.py (default: tools/ or the root; else 1 per task)")
    ap.add_argument("--results", default="results.json", help="where the Gradescope results.json goes")
    args = ap.parse_args(argv)
    plugin = Collect()
    pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-rN", "--tb=no",
                 os.path.join(ROOT, "tests", "test_tasks.py")], plugins=[plugin])
    if args.points:
        with open(args.points) as f:
            points = json.load(f)
    else:
        points = {f"task{n}": dict(points=1) for n in sorted({t["task"] for t in plugin.tests if t["task"]})}
    result = grade(points, plugin.tests)
    print(f"\n{'task':<58} score")
    for e in result["tests"]:
        print(f"{e['name']:<58} {e['score']:g} / {e['max_score']:g}")
    done = sum(e["score"] == e["max_score"] for e in result["tests"])
    print(f"{done} of {len(result['tests'])} tasks; score {result['score']:g} / "
          f"{sum(e['max_score'] for e in result['tests']):g}")
    with open(args.results, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
