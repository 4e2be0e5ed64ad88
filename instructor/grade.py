"""
Grading: the pristine graded tests run on a submission; points per test; Gradescope's results.json.

    python -m instructor.grade SUBMISSION --pristine DIR [--out results.json] [--timeout 30]
                               [--total-timeout 540] [--jail-user NAME] [--not-tamper-proof]

The autograder bundle calls this; in the instructor's repository use `python -m instructor grade`.
DIR holds the graders' own copies of the test files (unittests.py, unittests_ref.pt, conftest.py,
pytest.ini, hidden_tests.py), reference/gpt.py (the solution: the trusted reference that computes the
expected values at grade time; root's only) and the released version of every student module. Intake takes from
SUBMISSION (or its single sub-folder) only the student module names, only regular files (no links,
devices or FIFOs) of at most MAX_FILE bytes; the released module stands in for each one missing.

The tests run in a trusted process (runner.py) that never runs student code: it asks the jail
(jail.py, sealed in a sandbox) for values and checks them itself, on inputs it draws at grade time. It reports each test as it starts and finishes; the
grader writes a report that fails every test as soon as the tests are collected, then the real one
once every process of the run is gone. If the trusted process dies or runs out of time, the tests it
did not finish fail and a new one goes on with the rest.
"""

import argparse
import json
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

from files import atomic_write
from instructor import procs

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_FILES = ("unittests.py", "hidden_tests.py")  # graded in this order; hidden_tests.py is optional
HIDDEN_FILES = ("hidden_tests.py",)  # their results are shown to students once grades are published
INFRA = TEST_FILES + ("unittests_ref.pt", "conftest.py", "pytest.ini")  # never taken from a submission
PYTEST_ARGS = ("-p", "no:cacheprovider", "-q", "--tb=short", "-c", "pytest.ini", "--rootdir", ".")
TIMEOUT = 30.0  # seconds one test may run
TOTAL_TIMEOUT = 540.0  # seconds for all tests: below Gradescope's default limit of 10 minutes
IDLE_LIMIT = 180.0  # seconds the runner may spend outside any test (start-up: python, torch, the jail)
SLACK = 30.0  # seconds past a test's timeout before the grader stops the trusted process itself
MAX_FILE = 1 << 20  # bytes of one submitted module
POLL = 0.05
LOG_TAIL = 1500  # characters of the runner's own output shown when it dies
SAME_USER = "same user"  # jail_user value: run student code as this process's user, without a warning
REFERENCE = os.path.join("reference", "gpt.py")  # in the pristine folder: the trusted reference
KEY = os.path.join("reference", "key")  # and the course's secret: with the files, it decides the inputs drawn
RELEASED = "released"  # in the work folder: the released modules
RUNNER_MEMORY = 2 << 30  # bytes of data the trusted process may hold: an answer cannot make it allocate more
WARM = False  # set by instructor/warm.py: this process has the trusted process's imports, so it forks it


class GradeError(Exception):
    """Bad input, said in one line."""


def student_modules(pristine):
    """The files a submission may replace: the .py files of the pristine folder that are not test files."""
    return sorted(n for n in os.listdir(pristine) if n.endswith(".py") and n not in INFRA)


def submitted_folder(submission, modules):
    """SUBMISSION itself, or its only sub-folder (not a link) when the files were uploaded inside one."""
    entries = list(os.scandir(submission))
    if any(e.name in modules for e in entries):
        return submission
    folders = [e.path for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith((".", "__"))]
    return folders[0] if len(folders) == 1 else submission


def intake(submission, modules):
    """The student's modules: {name: bytes}, and {why: [names]} for the files left out."""
    folder = submitted_folder(submission, modules)
    taken, skipped = {}, {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        info = entry.stat(follow_symlinks=False)
        if entry.name not in modules:
            quiet = entry.name.startswith(".") or stat.S_ISDIR(info.st_mode)
            why = ("the grader uses its own copy" if entry.name in INFRA else
                   None if quiet else "not a module of the assignment")
        elif not stat.S_ISREG(info.st_mode):
            why = "not a regular file (links, devices and pipes are not read)"
        elif info.st_size > MAX_FILE:
            why = f"larger than {MAX_FILE:,} bytes"
        else:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                taken[entry.name] = f.read(MAX_FILE + 1)[:MAX_FILE]
            continue
        if why:
            skipped.setdefault(why, []).append(entry.name)
    return taken, skipped


def has_todos(path):
    with open(path, encoding="utf-8") as f:
        return "TODO[" in f.read()


def prepare(pristine, submission, workdir):
    """workdir/tests: the test files; workdir/modules: the released modules, then the student's; workdir/released:
    the released modules. -> notes."""
    modules = student_modules(pristine)
    taken, skipped = intake(submission, modules)
    os.makedirs(os.path.join(workdir, "tests"))
    os.makedirs(os.path.join(workdir, "modules"))
    os.makedirs(os.path.join(workdir, RELEASED))
    for name in os.listdir(pristine):
        source = os.path.join(pristine, name)
        if os.path.isfile(source):
            with open(source, "rb") as f:
                data = f.read()
            write_file(os.path.join(workdir, "modules" if name in modules else "tests", name), data)
            if name in modules:  # the runner reads its stubs to tell which TODO a hang is in
                write_file(os.path.join(workdir, RELEASED, name), data)
    for name, data in taken.items():
        write_file(os.path.join(workdir, "modules", name), data)
    if not os.path.isfile(os.path.join(pristine, REFERENCE)):
        raise GradeError(f"the pristine folder {pristine} lacks {REFERENCE}, the trusted reference: rebuild the "
                         f"autograder with python -m instructor release")
    os.makedirs(os.path.join(workdir, "reference"), mode=0o700)
    for path in (REFERENCE, KEY):
        if os.path.isfile(os.path.join(pristine, path)):
            shutil.copyfile(os.path.join(pristine, path), os.path.join(workdir, path))
    notes = [f"graded from the submission: {', '.join(taken) or 'no file'}"]
    with_todos = [n for n in modules if n not in taken and has_todos(os.path.join(pristine, n))]
    if with_todos:
        notes.append(f"not in the submission, graded as released (TODOs not done): {', '.join(with_todos)}")
    notes += [f"ignored, {why}: {', '.join(names)}" for why, names in skipped.items()]
    return notes


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


class Events:
    """Reads the JSON lines the runner appends, complete lines only."""

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
    """SIGKILL the runner and every process under it (a grader that is a subreaper, as on the command line,
    also gets what escaped from under a dead runner: it has no other children)."""
    try:
        os.kill(proc.pid, signal.SIGSTOP)  # it starts nothing new while its tree is killed
    except ProcessLookupError:
        pass
    procs.kill_tree(os.getpid() if procs.is_subreaper() else proc.pid, keep={proc.pid})
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def log_tail(log, start):
    """The end of what the runner printed since offset start."""
    with open(log, "rb") as f:
        f.seek(max(start, os.path.getsize(log) - LOG_TAIL))
        return f.read().decode("utf-8", "replace").strip()


def python_env(pythonpath=None, **extra):
    """This environment for a Python child: no inherited PYTHONPATH (it would decide what imports), only the
    given one, no bytecode written next to the sources, one OpenMP thread (tiny tensors: threads only add
    overhead and noise) unless set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONDONTWRITEBYTECODE="1", **({"PYTHONPATH": pythonpath} if pythonpath else {}), **extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def runner_limits():
    """The trusted process's memory cap (soft: the jail it starts gets a cap of its own)."""
    resource.setrlimit(resource.RLIMIT_DATA, (RUNNER_MEMORY, resource.getrlimit(resource.RLIMIT_DATA)[1]))


class Forked:
    """A child forked from this process, with the part of Popen's interface run_runner uses."""

    def __init__(self, pid):
        self.pid, self.returncode = pid, None

    def poll(self, flags=os.WNOHANG):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped by kill() (procs.reap) after it was killed
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        return self.poll(0)

    def kill(self):
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def start_runner(args, cwd, env, out):
    """The trusted test process: `python -m instructor.runner ARGS` in cwd, output to out; forked from this
    process, with the same environment, limits and session, when it is warm (WARM)."""
    if not WARM:
        return subprocess.Popen([sys.executable, "-m", "instructor.runner", *args], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=runner_limits)
    pid = os.fork()
    if pid:
        return Forked(pid)
    code = 1
    try:
        os.setsid()
        runner_limits()
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.path[0] = cwd  # as `python -m` run in cwd puts it first
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out.fileno(), 1), (out.fileno(), 2)):
            os.dup2(fd, target)
        from instructor import runner
        code = runner.main(args)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_runner(workdir, args, events, log, timeout, deadline, on_collected):
    """One runner on `args`, watched. -> (its events, the test it was stopped in or None, why)."""
    env = python_env(os.path.dirname(HERE))  # the grader's package only
    with open(log, "ab") as out:
        log_start = out.tell()
        proc = start_runner([events.path, *args], os.path.join(workdir, "tests"), env, out)
    seen, current, since = [], None, time.monotonic()
    while True:
        code = proc.poll()  # polled before reading, so that no event written before an exit is missed
        for event in events.read():
            seen.append(event)
            if "collected" in event:
                on_collected(event["collected"])
            if "start" in event or "done" in event:
                current, since = event.get("start"), time.monotonic()
        now = time.monotonic()
        if code is not None:
            kill(proc)  # anything left under it
            if current is None:
                return seen, None, f"the grader's test process exited (code {code}) before it"
            return seen, current, (f"the grader's test process died during this test (exit code {code}); its last "
                                   f"output:\n{log_tail(log, log_start)}")
        if now > deadline:
            kill(proc)
            return seen, current, "the grader's overall time limit ran out"
        if current is not None and now - since > timeout + SLACK:
            kill(proc)
            return seen, current, f"timed out: still running after {timeout:g} s, stopped"
        if current is None and now - since > IDLE_LIMIT:
            kill(proc)
            return seen, None, f"the grader's test process did nothing for {IDLE_LIMIT:g} s"
        time.sleep(POLL)


def run_tests(workdir, timeout=TIMEOUT, total_timeout=TOTAL_TIMEOUT, select=None, trace=(), user=SAME_USER,
              sealed=None, on_collected=lambda tests: None, hangs=None):
    """Run the tests of workdir/tests (all of TEST_FILES, or the node ids in select) on workdir/modules,
    student code in a jail run as user (SAME_USER: this process's user), sealed in a sandbox (None: when
    root); with trace (file names), record the lines each test executes in those files. hangs: a list that
    gets where tests hung (the runner's "hang" events: instructor/runner.py).
    -> (tests [{nodeid, points, todo}] in order, {nodeid: {passed, output[, lines]}}, problems [str])"""
    deadline = time.monotonic() + total_timeout
    sealed = os.geteuid() == 0 if sealed is None else sealed
    released = os.path.join(workdir, RELEASED)
    options = ["--modules", os.path.join(workdir, "modules"), "--reference", os.path.join(workdir, REFERENCE),
               "--timeout", str(timeout), *(["--user", user] if user != SAME_USER else []),
               *([] if sealed else ["--unsealed"]), *(["--released", released] if os.path.isdir(released) else []),
               *(["--trace", ",".join(trace)] if trace else []), *PYTEST_ARGS]
    tests, results, problems, hangs = None, {}, [], [] if hangs is None else hangs
    args = select or [n for n in TEST_FILES if os.path.exists(os.path.join(workdir, "tests", n))]
    with tempfile.TemporaryDirectory(prefix="grader-") as tmp:
        events, log = Events(os.path.join(tmp, "events.jsonl")), os.path.join(tmp, "runner.log")
        while args:
            known = ["--hangs", json.dumps(hangs)] if hangs else []  # a new runner does not wait for them again
            seen, stopped, why = run_runner(workdir, options + known + args, events, log, timeout, deadline,
                                            on_collected)
            done_before = len(results)
            for event in seen:
                if "collected" in event and tests is None:
                    tests = event["collected"]
                elif "collect_error" in event:
                    problems.append(f"collection error: {event['collect_error']}")
                elif "jail_error" in event:
                    raise GradeError(event["jail_error"])
                elif "warning" in event and event["warning"] not in problems:
                    print(f"warning: {event['warning']}", file=sys.stderr)
                elif "done" in event:
                    results[event.pop("done")] = event
                elif "hang" in event:
                    hangs.append(event["hang"])
            if stopped is not None:
                results[stopped] = {"passed": False, "output": why}
            if tests is None:
                problems.append(f"the tests could not be collected ({why}); runner log:\n{log_tail(log, 0)}")
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
    score = float(sum(e["score"] for e in entries))
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


def jail_account(user, sealed):
    """Who runs student code: user, `nobody` when root names none, else this user (unsealed only, with a
    warning)."""
    if os.geteuid() == 0:
        return user or "nobody"
    if user is None and not sealed:
        me = pwd.getpwuid(os.getuid()).pw_name
        print(f"warning: not root, so student code runs as you ({me}): it can read your files and tamper with "
              f"the grade", file=sys.stderr)
        return SAME_USER
    return user


def hang_note(hang):
    """One line of the report on a place where a test hung."""
    from instructor.runner import todos, where_hung  # pytest's import: only when a test hung
    what = f"{todos(hang['regions'])} hangs" if hang["regions"] else "a hang"
    return (f"{what} in {where_hung(hang)}: a test timed out there after {hang['seconds']:g} s; the tests after it "
            f"that cover it or reach that line failed without waiting")


def write_json(path, obj):
    """Write obj to path atomically (a new temporary file beside it, never a name someone else made)."""
    atomic_write(path, json.dumps(obj, indent=1), mode=0o644)


def failed_report(tests, why, notes=(), seconds=0):
    """Every test failed with the same message: what stays if the grading never ends."""
    return report(tests, {t["nodeid"]: {"passed": False, "output": why} for t in tests}, list(notes), seconds)


def grade(submission, pristine, out=None, timeout=TIMEOUT, total_timeout=TOTAL_TIMEOUT, quiet=False, user=None,
          sealed=True):
    """Grade one submission folder against the pristine folder, student code run as user (see jail_account),
    sealed in a sandbox unless told not to. -> the results.json object (also written to out, last)."""
    if not os.path.isdir(submission):
        raise GradeError(f"submission folder {submission} does not exist or is not a folder")
    user = jail_account(user, sealed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="submission-") as workdir:
        notes = prepare(pristine, submission, workdir)
        if not sealed:
            notes.append("graded without the sandbox (--not-tamper-proof): this grade is not tamper-proof")

        def on_collected(tests):
            if out:
                write_json(out, failed_report(tests, "not graded: the grader stopped before this test ended", notes))
        hangs = []
        tests, results, problems = run_tests(workdir, timeout, total_timeout, user=user, sealed=sealed,
                                             on_collected=on_collected, hangs=hangs)
    notes += [hang_note(h) for h in hangs]
    result = report(tests, results, notes + problems, time.monotonic() - start)
    if out:
        write_json(out, result)
    if not quiet:
        print_table(result)
    if not tests:
        raise GradeError("the graded tests could not run: " + "; ".join(problems))
    return result


def collect(pristine):
    """The graded tests of the pristine folder, collected without any student code. -> [{nodeid, ...}]"""
    with tempfile.TemporaryDirectory(prefix="collect-") as workdir:
        os.mkdir(os.path.join(workdir, "nothing"))
        prepare(pristine, os.path.join(workdir, "nothing"), workdir)
        with tempfile.TemporaryDirectory(prefix="grader-") as tmp:
            events = Events(os.path.join(tmp, "events.jsonl"))
            files = [n for n in TEST_FILES if os.path.exists(os.path.join(workdir, "tests", n))]
            seen, _, _ = run_runner(workdir, ["--modules", os.path.join(workdir, "modules"), "--reference",
                                              os.path.join(workdir, REFERENCE), "--collect-only", *PYTEST_ARGS, *files],
                                    events, os.path.join(tmp, "runner.log"), TIMEOUT, time.monotonic() + IDLE_LIMIT,
                                    lambda tests: None)
            return next((e["collected"] for e in seen if "collected" in e), [])


def add_arguments(parser):
    parser.add_argument("submission", help="folder with the student's files (or with one folder holding them)")
    parser.add_argument("--out", help="where to write results.json")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help=f"seconds one test may run (default {TIMEOUT:g})")
    parser.add_argument("--total-timeout", type=float, default=TOTAL_TIMEOUT,
                        help=f"seconds for all tests together (default {TOTAL_TIMEOUT:g})")
    parser.add_argument("--jail-user", help="the unprivileged user that runs student code when grading as root "
                                            "(default: nobody)")
    parser.add_argument("--not-tamper-proof", dest="sealed", action="store_false",
                        help="grade even where student code cannot be sealed in a sandbox (not root, no bubblewrap, "
                             "no namespaces): the submission can then tamper with its grade and others'")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m instructor.grade", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--pristine", required=True, help="folder with the graders' test files and released modules")
    parser.add_argument("--failed-report", metavar="WHY",
                        help="only write a report to --out that fails every test with this message")
    args = parser.parse_args(argv)
    procs.become_subreaper()  # what a dead runner leaves behind comes to us, to be killed
    try:
        if args.failed_report is not None:
            write_json(args.out, failed_report(collect(args.pristine), args.failed_report))
        else:
            grade(args.submission, args.pristine, args.out, args.timeout, args.total_timeout, user=args.jail_user,
                  sealed=args.sealed)
    except GradeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
