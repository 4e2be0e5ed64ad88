"""
Grading: the pristine graded tests run on a submission; points per test; Gradescope's results.json.

    python -m instructor.grade SUBMISSION --pristine DIR [--out results.json] [--timeout 30] [--total-timeout 540]

The autograder bundle calls this; in the instructor's repository use `python -m instructor grade`.
DIR holds the graders' own copies of the test files (unittests.py, unittests_ref.pt, conftest.py,
pytest.ini, hidden_tests.py) and the released version of every student module. A work folder gets all
of them, then the student's modules (only those names, from SUBMISSION or its single sub-folder), so
edited tests or extra files in a submission change nothing.

The tests run in a worker process (worker.py) that reports each test as it starts and finishes. When a
test runs past its timeout, or the worker dies (a hang in native code, a crash, os._exit), the grader
kills the worker and everything it started, records that test as failed and starts a new worker on the
tests left: each hang costs its timeout, and every collected test appears in the report.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
TEST_FILES = ("unittests.py", "hidden_tests.py")  # graded in this order; hidden_tests.py is optional
HIDDEN_FILES = ("hidden_tests.py",)  # their results are shown to students once grades are published
INFRA = TEST_FILES + ("unittests_ref.pt", "conftest.py", "pytest.ini")  # never taken from a submission
PYTEST_ARGS = ("-p", "no:cacheprovider", "-q", "--tb=short", "-c", "pytest.ini", "--rootdir", ".")
TIMEOUT = 30.0  # seconds one test may run
TOTAL_TIMEOUT = 540.0  # seconds for all tests: below Gradescope's default limit of 10 minutes
IDLE_LIMIT = 120.0  # seconds the worker may spend outside any test (start-up: python, torch, collection)
POLL = 0.05
LOG_TAIL = 1500  # characters of the worker's own output shown when it dies


class GradeError(Exception):
    """Bad input, said in one line."""


def student_modules(pristine):
    """The files a submission may replace: the .py files of the pristine folder that are not test files."""
    return sorted(n for n in os.listdir(pristine) if n.endswith(".py") and n not in INFRA)


def submitted_folder(submission, modules):
    """SUBMISSION itself, or its only sub-folder when the files were uploaded inside one."""
    if any(os.path.isfile(os.path.join(submission, n)) for n in modules):
        return submission
    folders = [e.path for e in os.scandir(submission) if e.is_dir() and not e.name.startswith((".", "__"))]
    return folders[0] if len(folders) == 1 else submission


def has_todos(path):
    with open(path, encoding="utf-8") as f:
        return "TODO[" in f.read()


def prepare(pristine, submission, workdir):
    """Fill workdir with the pristine files, then the student's modules. -> notes for the report."""
    shutil.copytree(pristine, workdir, dirs_exist_ok=True)
    modules = student_modules(pristine)
    folder = submitted_folder(submission, modules)
    taken = [n for n in modules if os.path.isfile(os.path.join(folder, n))]
    for name in taken:
        shutil.copyfile(os.path.join(folder, name), os.path.join(workdir, name))
    notes = [f"graded from the submission: {', '.join(taken) or 'no file'}"]
    with_todos = [n for n in modules if n not in taken and has_todos(os.path.join(pristine, n))]
    if with_todos:
        notes.append(f"not in the submission, graded as released (TODOs not done): {', '.join(with_todos)}")
    ignored = sorted(n for n in os.listdir(folder) if n in INFRA)
    if ignored:
        notes.append(f"ignored, the grader uses its own copy: {', '.join(ignored)}")
    return notes


class Events:
    """Reads the JSON lines the worker appends, complete lines only."""

    def __init__(self, path):
        self.path, self.offset, self.partial = path, 0, b""

    def read(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def kill(proc):
    """SIGKILL the worker's whole process group (it runs in its own session): no signal handler,
    no native code, no child process survives it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def log_tail(log, start):
    """The end of what the worker printed since offset start."""
    with open(log, "rb") as f:
        f.seek(max(start, os.path.getsize(log) - LOG_TAIL))
        return f.read().decode("utf-8", "replace").strip()


def run_worker(workdir, args, events, log, timeout, deadline, env):
    """One worker on `args`, watched. -> (its events, the test it was stopped in or None, why)."""
    with open(log, "ab") as out:
        log_start = out.tell()
        proc = subprocess.Popen([sys.executable, WORKER, events.path, *args], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen, current, since = [], None, time.monotonic()
    while True:
        code = proc.poll()  # polled before reading, so that no event written before an exit is missed
        for event in events.read():
            seen.append(event)
            if "start" in event or "done" in event:
                current, since = event.get("start"), time.monotonic()
        now = time.monotonic()
        if code is not None:
            kill(proc)  # its leftover children
            if current is None:
                return seen, None, f"the test process exited (code {code}) before it"
            return seen, current, (f"the test process died during this test (exit code {code}); its last output:\n"
                                   f"{log_tail(log, log_start)}")
        if now > deadline:
            kill(proc)
            return seen, current, "the grader's overall time limit ran out"
        if current is not None and now - since > timeout:
            kill(proc)
            return seen, current, f"timed out: still running after {timeout:g} s, stopped"
        if current is None and now - since > IDLE_LIMIT:
            kill(proc)
            return seen, None, f"the test process did nothing for {IDLE_LIMIT:g} s"
        time.sleep(POLL)


def run_tests(workdir, timeout=TIMEOUT, total_timeout=TOTAL_TIMEOUT, select=None, trace=()):
    """Run the tests of workdir (all of TEST_FILES, or the node ids in select) under the watchdog; with
    trace (file names), record the lines each test executes in those files.
    -> (tests [{nodeid, points, todo}] in order, {nodeid: {passed, output[, lines]}}, problems [str])"""
    deadline = time.monotonic() + total_timeout
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # imports come from the work folder only
    env.update(PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only add overhead and noise
    options = [*(["--trace", ",".join(trace)] if trace else []), *PYTEST_ARGS]
    tests, results, problems = None, {}, []
    args = select or [n for n in TEST_FILES if os.path.exists(os.path.join(workdir, n))]
    with tempfile.TemporaryDirectory(prefix="grader-") as tmp:
        events, log = Events(os.path.join(tmp, "events.jsonl")), os.path.join(tmp, "worker.log")
        while args:
            seen, stopped, why = run_worker(workdir, options + args, events, log, timeout, deadline, env)
            done_before = len(results)
            for event in seen:
                if "collected" in event and tests is None:
                    tests = event["collected"]
                elif "collect_error" in event:
                    problems.append(f"collection error: {event['collect_error']}")
                elif "done" in event:
                    results[event.pop("done")] = event
            if stopped is not None:
                results[stopped] = {"passed": False, "output": why}
            if tests is None:
                problems.append(f"the tests could not be collected ({why}); worker log:\n{log_tail(log, 0)}")
                return [], results, problems
            args = [t["nodeid"] for t in tests if t["nodeid"] not in results]
            if args and (len(results) == done_before or time.monotonic() > deadline):
                for nodeid in args:  # no progress (or no time) left: the rest did not run
                    results[nodeid] = {"passed": False, "output": f"not run: {why}"}
                args = []
    return tests, results, problems


def report(tests, results, notes, seconds):
    """The results.json object, in Gradescope's autograder format."""
    entries = []
    for number, test in enumerate(tests, start=1):
        passed, output = results[test["nodeid"]]["passed"], results[test["nodeid"]]["output"]
        file, _, name = test["nodeid"].partition("::")
        hidden = file in HIDDEN_FILES
        points = float(test["points"])
        entries.append({
            "name": f"hidden: {name}" if hidden else name,
            "number": str(number),
            "score": points if passed else 0.0,
            "max_score": points,
            "status": "passed" if passed else "failed",
            "output": output,
            "visibility": "after_published" if hidden else "visible",
            "tags": list(test["todo"]),
        })
    score = sum(e["score"] for e in entries)
    total = sum(e["max_score"] for e in entries)
    failed = sum(e["status"] == "failed" for e in entries)
    summary = f"score {score:g} / {total:g}: {len(entries) - failed} of {len(entries)} tests passed"
    return {
        "score": score,
        "execution_time": round(seconds),
        "output": "\n".join([summary] + notes),
        "output_format": "text",
        "test_output_format": "text",
        "visibility": "visible",
        "tests": entries,
    }


def reason(output, limit=100):
    """The line of a test's output that says why it failed: pytest's `E ...` line, else the first one."""
    lines = [line.strip() for line in output.strip().splitlines()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors or lines or [""])[0][:limit]


def print_table(result):
    """The score table on stdout: one line per test, why each failed test failed, the total."""
    width = max([len(t["name"]) for t in result["tests"]] + [4])
    print(f"{'#':>3}  {'test':<{width}}  {'points':>7}  status")
    for t in result["tests"]:
        why = reason(t["output"], 80) if t["status"] == "failed" else ""
        points = f"{t['score']:g}/{t['max_score']:g}"
        print(f"{t['number']:>3}  {t['name']:<{width}}  {points:>7}  {t['status']:<6}  {why}".rstrip())
    print(result["output"])


def grade(submission, pristine, out=None, timeout=TIMEOUT, total_timeout=TOTAL_TIMEOUT, quiet=False):
    """Grade one submission folder against the pristine folder. -> the results.json object (also written to out)."""
    if not os.path.isdir(submission):
        raise GradeError(f"submission folder {submission} does not exist or is not a folder")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="submission-") as workdir:
        notes = prepare(pristine, submission, workdir)
        tests, results, problems = run_tests(workdir, timeout, total_timeout)
    result = report(tests, results, notes + problems, time.monotonic() - start)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(out + ".tmp", out)
    if not quiet:
        print_table(result)
    if not tests:
        raise GradeError("the graded tests could not run: " + "; ".join(problems))
    return result


def add_arguments(parser):
    parser.add_argument("submission", help="folder with the student's files (or with one folder holding them)")
    parser.add_argument("--out", help="where to write results.json")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help=f"seconds one test may run (default {TIMEOUT:g})")
    parser.add_argument("--total-timeout", type=float, default=TOTAL_TIMEOUT,
                        help=f"seconds for all tests together (default {TOTAL_TIMEOUT:g})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m instructor.grade", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--pristine", required=True, help="folder with the graders' test files and released modules")
    args = parser.parse_args(argv)
    try:
        grade(args.submission, args.pristine, args.out, args.timeout, args.total_timeout)
    except GradeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
