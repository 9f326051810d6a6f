"""Turn the repository into a graded course assignment: a student copy, a solution copy and a grader.

    python tools/make_assignment.py --out runs/assignment

Regions of the .py files are marked with comments (the repository runs unchanged), in the otter-grader and
nbgrader spelling: a line `BEGIN SOLUTION task=N` and a line `END SOLUTION` (each after a `# `) around the
body the student writes, optionally preceded right away by a hint between `BEGIN PROMPT` and `END PROMPT`
lines (kept, as comments, in the student copy only); or a statement followed by the comment
`SOLUTION task=N` (the one-line form). docs/TEACHING.md shows them as they are written.

DIR/student/ has each region replaced by `raise NotImplementedError("task N: ...")` at its indentation,
DIR/solution/ has the markers removed and the code kept, DIR/grader/ holds the task tests
(tests/test_tasks.py, tagged `@pytest.mark.task(N)`), tools/grade.py and points.json. The parsing is
strict: nested or unbalanced markers, a misspelt marker, or a task id used in two functions stop it
with one line naming file:line (exit 2). Pure standard library; docs/TEACHING.md is the handout.
"""
import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOL, PROMPT = "SOLUTION", "PROMPT"  # spelt apart so that this file's own lines are no markers
BEGIN_SOL = re.compile(rf"^(\s*)# BEGIN {SOL} task=(\d+)\s*$")
END_SOL = re.compile(rf"^\s*# END {SOL}\s*$")
BEGIN_PROMPT = re.compile(rf"^\s*# BEGIN {PROMPT}\s*$")
END_PROMPT = re.compile(rf"^\s*# END {PROMPT}\s*$")
ONE_LINE = re.compile(rf"^(\s*)(\S.*?)\s+# {SOL} task=(\d+)\s*$")
# Anything that looks like a marker but matches none of the forms above is a misspelling.
LOOKS_LIKE = re.compile(rf"(^\s*#\s*(BEGIN|END)\b.*\b({SOL}|{PROMPT})\b)|(#\s*{SOL}\b)", re.IGNORECASE)
GRADER_FILES = ("tests/test_tasks.py", "tests/conftest.py", "tools/grade.py")


class MarkerError(Exception):
    """A malformed marker; the message is one line, file:line: what is wrong."""


def enclosing_function(lines, i):
    """The name of the innermost `def` whose body holds line i (0-based), by indentation; '' at top level."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    for j in range(i - 1, -1, -1):
        m = re.match(r"^(\s*)(async\s+)?def\s+(\w+)", lines[j])
        if m and len(m.group(1)) < indent:
            return owner_class(lines, j) + f"{m.group(3)}@{j + 1}"
    return ""


def owner_class(lines, j):
    """'Name.' when the def on line j (0-based) is a method of class Name, else ''."""
    indent = len(lines[j]) - len(lines[j].lstrip())
    for i in range(j - 1, -1, -1):
        m = re.match(r"^(\s*)(class|def)\s+(\w+)", lines[i])
        if m and len(m.group(1)) < indent:
            return f"{m.group(3)}." if m.group(2) == "class" else ""
    return ""


def parse(text, name="<text>"):
    """The marked regions of one file's text, in order.

    Dicts with task, kind ('block' or 'line'), the
    0-based line span [start, end] (markers and prompt included), indent, prompt lines, function."""
    lines, regions, state, cur = text.split("\n"), [], None, None
    for i, line in enumerate(lines):
        where = f"{name}:{i + 1}"
        if m := BEGIN_SOL.match(line):
            if state == "solution":
                raise MarkerError(f"{where}: nested BEGIN {SOL} (the one at line {cur['start'] + 1} is still open)")
            prompt = cur["prompt"] if state == "prompt_done" else []
            start = cur["start"] if state == "prompt_done" else i
            cur = dict(task=int(m.group(2)), kind="block", start=start, indent=m.group(1), prompt=prompt,
                       function=enclosing_function(lines, i), line=i + 1, body=i + 1)
            state = "solution"
        elif END_SOL.match(line):
            if state != "solution":
                raise MarkerError(f"{where}: END {SOL} without a BEGIN {SOL}")
            cur["end"], state = i, None
            regions.append(cur)
        elif BEGIN_PROMPT.match(line):
            if state is not None:
                raise MarkerError(f"{where}: BEGIN {PROMPT} inside another marked region")
            cur, state = dict(start=i, prompt=[]), "prompt"
        elif END_PROMPT.match(line):
            if state != "prompt":
                raise MarkerError(f"{where}: END {PROMPT} without a BEGIN {PROMPT}")
            state = "prompt_done"
        elif state == "prompt":
            cur["prompt"].append(line.strip().lstrip("#").strip())
        elif state == "prompt_done":
            raise MarkerError(f"{where}: a {PROMPT} block must be followed right away by BEGIN {SOL}")
        elif m := ONE_LINE.match(line):
            if state == "solution":
                raise MarkerError(f"{where}: one-line {SOL} marker inside a BEGIN {SOL} region")
            regions.append(dict(task=int(m.group(3)), kind="line", start=i, end=i, indent=m.group(1), prompt=[],
                                function=enclosing_function(lines, i), line=i + 1))
        elif LOOKS_LIKE.search(line):
            raise MarkerError(f"{where}: unknown marker {line.strip()!r}; the forms are '# BEGIN {SOL} task=N', "
                              f"'# END {SOL}', '# BEGIN {PROMPT}', '# END {PROMPT}' and 'code  # {SOL} task=N'")
    if state is not None:
        raise MarkerError(f"{name}:{cur['start'] + 1}: {'BEGIN ' + SOL if state == 'solution' else PROMPT} "
                          "block never closed")
    return regions


def docstring_equation(text, region):
    """'Eq. (n)' from the docstring of the function holding the region, if it names one."""
    fn = region["function"]
    if not fn:
        return None
    name, line = fn.split("@")
    for node in ast.walk(ast.parse(text)):  # the function's docstring, else its class's
        for fn in [node, *getattr(node, "body", [])]:
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.lineno == int(line):
                docs = ast.get_docstring(fn) or (ast.get_docstring(node) if isinstance(node, ast.ClassDef) else "")
                m = re.search(r"Eq\. \((\d+'?)\)", docs or "")
                return f"Eq. ({m.group(1)})" if m else None
    return None


def render(text, regions, solved=()):
    """One rendering of a marked file: unsolved tasks raise, solved ones keep their code.

    The text with each region of a task not in `solved` replaced by a raise (the student copy) and the
    markers of the others removed, code kept (the solution copy: solved = every task)."""
    lines, out, k = text.split("\n"), [], 0
    for r in regions:
        out += lines[k:r["start"]]
        body = lines[r["start"]:r["end"] + 1]
        if r["kind"] == "line":
            code = ONE_LINE.match(body[0])
            out.append(code.group(1) + code.group(2) if r["task"] in solved else
                       f'{r["indent"]}raise NotImplementedError("task {r["task"]}: {r["hint"]}")')
        elif r["task"] in solved:
            out += lines[r["body"]:r["end"]]
        else:
            out += [r["indent"] + "# " + p for p in r["prompt"]]
            out.append(f'{r["indent"]}raise NotImplementedError("task {r["task"]}: {r["hint"]}")')
        k = r["end"] + 1
    return "\n".join(out + lines[k:])


def tracked_files(root):
    """The repository's files: git's list, or (no git) a walk that skips .venv, runs, .git and caches."""
    if os.path.exists(os.path.join(root, ".git")):  # a folder, or a file in a git worktree
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        return sorted(p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p)))
    else:
        skip = {".venv", "runs", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"}
        found = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in skip]
            found += [os.path.relpath(os.path.join(d, f), root) for f in files if not f.endswith(".pyc")]
        return sorted(found)


def collect(root, files):
    """{path: (text, regions)} of every marked .py file, each region with its hint; one function per task."""
    marked, owner = {}, {}
    for path in files:
        if not path.endswith(".py"):
            continue
        with open(os.path.join(root, path), encoding="utf-8") as f:
            text = f.read()
        regions = parse(text, path)
        for r in regions:
            fn = (path, r["function"])
            if owner.setdefault(r["task"], (fn, r["line"]))[0] != fn:
                (p0, f0), l0 = owner[r["task"]]
                raise MarkerError(f"{path}:{r['line']}: task {r['task']} is already used in another function "
                                  f"({p0}:{l0}); one task, one function")
            name = r["function"].split("@")[0] or "module level"
            eq = docstring_equation(text, r)
            r["hint"] = f"write {name}" + (f", {eq} of docs/METHOD.md" if eq else "")  # the prompt stays above
            r["name"], r["equation"] = name, eq
        if regions:
            marked[path] = (text, regions)
    return marked


def tasks_of(marked):
    """{task: {'file', 'function', 'equation'}}, ordered by task id."""
    tasks = {}
    for path, (_, regions) in marked.items():
        for r in regions:
            tasks.setdefault(r["task"], dict(file=path, function=r["name"], equation=r["equation"]))
    return dict(sorted(tasks.items()))


def write_copy(root, files, marked, dest, solved):
    """Copy `files` from root into dest, the marked ones rendered with the tasks `solved` kept."""
    for path in files:
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if path in marked:
            text, regions = marked[path]
            with open(target, "w", encoding="utf-8") as f:
                f.write(render(text, regions, solved))
        else:
            shutil.copy2(os.path.join(root, path), target)


def make(root, out):
    """Write out/student, out/solution and out/grader from the repository at root; returns the tasks."""
    files = [p for p in tracked_files(root) if not p.startswith(os.path.relpath(out, root) + os.sep)]
    marked = collect(root, files)
    tasks = tasks_of(marked)
    for sub in ("student", "solution", "grader"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    write_copy(root, files, marked, os.path.join(out, "student"), solved=())
    write_copy(root, files, marked, os.path.join(out, "solution"), solved=set(tasks))
    write_copy(root, [p for p in GRADER_FILES if p in files], {}, os.path.join(out, "grader"), ())
    points = {f"task{n}": dict(points=1, **t) for n, t in tasks.items()}
    for where in ("grader/points.json", "student/tools/points.json", "solution/tools/points.json"):
        os.makedirs(os.path.dirname(os.path.join(out, where)), exist_ok=True)
        with open(os.path.join(out, where), "w") as f:  # tools/grade.py reads it for the task names
            json.dump(points, f, indent=1)
    return tasks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/assignment", help="the folder of student/, solution/ and grader/")
    ap.add_argument("--root", default=ROOT, help="the repository to read (default: this one)")
    args = ap.parse_args(argv)
    try:
        tasks = make(os.path.abspath(args.root), os.path.abspath(args.out))
    except MarkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for n, t in tasks.items():
        print(f"task {n:2d}  {t['file']}  {t['function']}  {t['equation'] or ''}")
    print(f"{len(tasks)} tasks -> {args.out}/student, {args.out}/solution, {args.out}/grader")
    return 0


if __name__ == "__main__":
    sys.exit(main())
