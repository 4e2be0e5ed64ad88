"""
Grading a whole class: every submission graded in its own sandbox exactly as `instructor grade` does (the same
grader, one process each), several at a time; a CSV of grades, each student's results and feedback, and a
class report.

    python -m instructor grade-all SUBMISSIONS --out DIR [--jobs N] [--shard I/N | --merge] [grade's options]

SUBMISSIONS is a folder with one sub-folder per student, or an LMS bulk download, zipped or unpacked: Canvas'
flat `<name>_<id>_<submission id>_<file>` (`<name>_LATE_...` for late ones; `gpt-1.py` for a resubmitted
`gpt.py`), Moodle's `<Full Name>_<id>_assignsubmission_file_/` folders, Brightspace's
`<id>-<id> - <Full Name> - <date>/` folders. A zip a student uploaded is read too. Only the graded modules are
taken (by name, wherever they sit in the student's files), nothing is unpacked outside DIR, and a student whose
files hold a link, a path leaving their folder, a member over MAX_FILE or more than MAX_MEMBERS files is refused
(reported in their row, never fatal for the class).

DIR gets
    submissions/<student>/   the modules taken from each student
    results/<student>.json   Gradescope's results format; extra_data: status, seconds, the key of files and tests
    feedback/<student>.txt   the score table the student would see
    grades.csv               one row per student: total, points per TODO region and per test group, status
    report.md, report/       the class report (instructor/class_report.py)
A submission whose files and tests have not changed since its result was written is not graded again, so a run
stopped by Ctrl-C (finished results stay) continues where it stopped. --shard I/N grades every N-th student
from the I-th (a Slurm array task, slurm/grade_class.job); --merge then writes grades.csv and the report from
every shard's results.
"""

import collections
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed

from files import atomic_write
from instructor import grade, release

MAX_FILE = grade.MAX_FILE  # bytes of one member that is taken or read (a zip inside is read up to this too)
MAX_MEMBERS = 2000  # entries of one student's files
CANVAS = re.compile(r"^(?P<student>[^_/]+?(?:_LATE)?_\d+)_\d+_(?P<file>.+)$")
MOODLE = re.compile(r"^(?P<student>.+?_\d+)_assign(?:submission|feedback)_\w+?_?$")
BRIGHTSPACE = re.compile(r"^\d+-\d+ - (?P<student>.+?) - .+$")
RESUBMITTED = re.compile(r"^(?P<stem>.+?)-\d+(?P<ext>\.\w+)$")  # Canvas renames a second gpt.py to gpt-1.py
GROUPS = ("public", "hidden")  # the test groups of grades.csv: hidden tests' names start with "hidden: "


class Refused(Exception):
    """A student's files that are not read, and why (one line)."""


# ----------------------------------------------------------------------------- intake

def student_name(top):
    """The student a top-level folder (or Canvas file name) belongs to, as the LMS wrote it."""
    for layout in (MOODLE, BRIGHTSPACE):
        match = layout.match(top)
        if match:
            return match.group("student")
    return top


def safe_name(student, taken):
    """A file name for the student: letters, digits, '.', '-' and '_' only, unique among taken."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", student).strip("._") or "student"
    unique, n = name, 1
    while unique.lower() in taken:
        n += 1
        unique = f"{name}-{n}"
    taken.add(unique.lower())
    return unique


Member = collections.namedtuple("Member", "path size read problem")  # problem: why it cannot be read, or None


def path_problem(path):
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path) or ".." in parts:
        return "leaves its folder"
    return None


def zip_members(archive):
    """The files of a zip as Members (a link, or a path leaving the folder, is a problem); a folder is a Member
    with no reader (a student's empty folder)."""
    for info in archive.infolist():
        if info.is_dir():
            yield Member(info.filename.rstrip("/"), 0, None, path_problem(info.filename))
        else:
            link = stat.S_ISLNK(info.external_attr >> 16)
            yield Member(info.filename, info.file_size, lambda info=info: archive.open(info).read(MAX_FILE + 1),
                         path_problem(info.filename) or ("is a link" if link else None))


def folder_members(folder):
    """The files under a folder as Members, paths relative to it (a link or a special file is a problem); a
    folder is a Member with no reader."""
    for root, dirs, names in os.walk(folder):
        for name in sorted(dirs + names):
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or (name in names and not stat.S_ISREG(mode)):
                problem = "is a link" if stat.S_ISLNK(mode) else "is not a regular file"
                yield Member(os.path.relpath(path, folder), 0, None, problem)
            elif name in dirs:
                yield Member(os.path.relpath(path, folder), 0, None, None)
            else:
                yield Member(os.path.relpath(path, folder), os.path.getsize(path),
                             lambda path=path: open(path, "rb").read(MAX_FILE + 1), None)


def by_student(members):
    """{student: [Member with the path inside their files]}, by the top folder or by Canvas' flat file names,
    and the top-level paths that belong to no student."""
    students, ignored = {}, []
    for m in members:
        top, _, rest = m.path.replace("\\", "/").partition("/")
        canvas = CANVAS.match(top)
        if top in ("", ".", "..") or re.match(r"^[A-Za-z]:$", top):  # the archive's own path escapes: no one's
            ignored.append(m.path)
        elif m.read is None and not m.problem:  # a folder: its student exists, even with nothing in it
            students.setdefault(student_name(top), [])
        elif rest:
            students.setdefault(student_name(top), []).append(m._replace(path=rest))
        elif canvas:
            name = canvas.group("file")
            resubmitted = RESUBMITTED.match(name)
            name = resubmitted.group("stem") + resubmitted.group("ext") if resubmitted else name
            students.setdefault(canvas.group("student").replace("_LATE", ""), []).append(m._replace(path=name))
        else:
            ignored.append(m.path)
    return students, ignored


def taken_modules(files, modules, where=""):
    """{module name: bytes} of one student: the graded modules by name wherever they sit (the shallowest copy of
    each), those in a zip the student uploaded too. Refused: a link, a path leaving the folder, a member over
    MAX_FILE, more than MAX_MEMBERS files, an unreadable zip."""
    files = list(files)
    if len(files) > MAX_MEMBERS:
        raise Refused(f"{where}{len(files)} files (at most {MAX_MEMBERS})")
    bad = next((m for m in files if m.problem), None)
    if bad:
        raise Refused(f"{where}{bad.path} {bad.problem}")
    found = {}
    for m in sorted(files, key=lambda m: (m.path.count("/"), m.path)):
        name = os.path.basename(m.path.replace("\\", "/"))
        wanted = name in modules and name not in found
        if not wanted and not (name.endswith(".zip") and not where):
            continue
        data = m.read()
        if m.size > MAX_FILE or len(data) > MAX_FILE:
            raise Refused(f"{where}{m.path} is over {MAX_FILE:,} bytes")
        if wanted:
            found[name] = data
            continue
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                for module, text in taken_modules(zip_members(inner), modules, f"{m.path}: ").items():
                    found.setdefault(module, text)
        except zipfile.BadZipFile:
            raise Refused(f"{m.path} is not a readable zip") from None
    return found


def intake(submissions, modules):
    """{student: {module: bytes} or Refused}, and the top-level entries that belong to no student."""
    def take(files):
        try:
            return taken_modules(files, modules)
        except Refused as e:
            return e

    if os.path.isfile(submissions):
        try:
            with zipfile.ZipFile(submissions) as archive:
                students, ignored = by_student(zip_members(archive))
                return {s: take(files) for s, files in students.items()}, ignored
        except zipfile.BadZipFile:
            raise grade.GradeError(f"{submissions} is not a zip file; pass a zip or a folder of submissions") from None
    if not os.path.isdir(submissions):
        raise grade.GradeError(f"{submissions} does not exist; pass a folder of submissions or an LMS zip")
    students, ignored = by_student(folder_members(submissions))
    return {s: take(files) for s, files in students.items()}, ignored


# ----------------------------------------------------------------------------- grading

def tests_key(pristine):
    """What the grade of unchanged files depends on: the graders' own files (tests, reference values, solution)."""
    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(pristine)):
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, pristine).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def files_key(modules, tests):
    digest = hashlib.sha256(tests.encode())
    for name in sorted(modules):
        digest.update(name.encode() + b"\0" + hashlib.sha256(modules[name]).digest())
    return digest.hexdigest()


def previous(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Grader:
    """Grades students one per grading forked from a warm process (instructor/warm.py: torch and the grader imported
    once for the class), each in its own session, so that Ctrl-C reaches only this process, which then stops them:
    their trusted processes and sandboxes die with them."""

    def __init__(self, pristine, options):
        self.pristine, self.options = pristine, options
        self.lock, self.stopping, self.requests = threading.Lock(), False, {}  # {id: {"pid", "exit", "ended"}}
        self.warm = subprocess.Popen([sys.executable, "-m", "instructor.warm"], cwd=release.ROOT,
                                     env=grade.python_env(os.path.dirname(grade.HERE)), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True)
        threading.Thread(target=self.listen, daemon=True).start()

    def listen(self):
        for line in self.warm.stdout:
            message = json.loads(line)
            with self.lock:
                request = self.requests[message["id"]]
                request.update(message)
            if "exit" in message:
                request["ended"].set()
        with self.lock:  # the warm process is gone: what was running ends with it
            for request in self.requests.values():
                request["ended"].set()

    def grade(self, folder, out):
        """-> (results or None, seconds, the grader's error line)."""
        start = time.monotonic()
        tmp, log = out + ".grading", out + ".log"
        with self.lock:
            if self.stopping:
                return None, 0.0, "stopped"
            number = len(self.requests)
            request = self.requests[number] = {"ended": threading.Event()}
            argv = [folder, "--pristine", self.pristine, "--out", tmp, *self.options]
            try:
                self.warm.stdin.write((json.dumps({"id": number, "argv": argv, "log": log}) + "\n").encode())
                self.warm.stdin.flush()
            except OSError:  # it died (its error is above, on stderr)
                return None, 0.0, f"the warm grading process ended (exit code {self.warm.poll()})"
        request["ended"].wait()
        seconds = time.monotonic() - start
        result, err = previous(tmp), ""
        with contextlib.suppress(OSError), open(log, encoding="utf-8", errors="replace") as f:
            err = f.read()
        for path in (tmp, log):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        code = request.get("exit", "none: the warm grading process ended")
        if code != 0 or result is None:
            return None, seconds, (err.strip().splitlines() or [f"exit code {code}"])[-1]
        return result, seconds, ""

    def stop(self):
        """Kill every grading still running, then the warm process."""
        with self.lock:
            self.stopping = True
            for request in self.requests.values():
                if "pid" in request and "exit" not in request:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(request["pid"], signal.SIGKILL)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.close()

    def close(self):
        with contextlib.suppress(OSError):
            self.warm.stdin.close()  # the warm process kills what still runs and exits
        self.warm.wait()


def refused_result(tests, why):
    return grade.failed_report(tests, f"not graded: {why}", [f"not graded: {why}"])


def grade_students(students, out, pristine, tests, options, jobs, progress):
    """Grade every student not graded yet with the same files and tests; results/<student>.json each.
    -> how many were graded."""
    key_tests = tests_key(pristine)
    todo = []
    for student, taken in students.items():
        path = os.path.join(out, "results", f"{student}.json")
        if isinstance(taken, Refused):
            extra = {"student": student, "status": f"refused: {taken}", "key": None, "seconds": 0}
            write_result(out, student, {**refused_result(tests, taken), "extra_data": extra})
            progress.update()
            continue
        key = files_key(taken, key_tests)
        old = previous(path)
        if old and old.get("extra_data", {}).get("key") == key:
            progress.update()
            continue
        for stale in (".grading", ".log"):  # what a grading killed with grade-all left
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + stale)
        folder = os.path.join(out, "submissions", student)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for name, data in taken.items():
            atomic_write(os.path.join(folder, name), data)
        todo.append((student, folder, key))
    if not todo:
        return 0
    grader = Grader(pristine, options)
    with grader, ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(grader.grade, folder, os.path.join(out, "results", f"{student}.json")): (student, key)
                   for student, folder, key in todo}
        try:
            for future in as_completed(futures):
                student, key = futures[future]
                result, seconds, error = future.result()
                if result is None and grader.stopping:
                    continue
                if result is None:  # the grader itself failed (bad input): the student's row says why
                    result = refused_result(tests, f"the grader failed: {error}")
                    status = f"error: {error}"
                else:
                    status = "graded"
                result["extra_data"] = {"student": student, "status": status, "seconds": round(seconds, 1),
                                        "key": key if status == "graded" else None}  # the next run tries again
                write_result(out, student, result)
                progress.update()
        except KeyboardInterrupt:
            grader.stop()
            for future in futures:
                future.cancel()
            raise
    return len(todo)


def write_result(out, student, result):
    atomic_write(os.path.join(out, "results", f"{student}.json"), json.dumps(result, indent=1))
    feedback = io.StringIO()
    with contextlib.redirect_stdout(feedback):
        grade.print_table(result)
    atomic_write(os.path.join(out, "feedback", f"{student}.txt"), feedback.getvalue())


# ----------------------------------------------------------------------------- grades.csv

def regions_of(tests):
    """The TODO regions in the tests' order (what each test checks)."""
    return list(dict.fromkeys(r for t in tests for r in t.get("checks", t["todo"])))


def rows(out, tests):
    """One row per student from results/*.json: total, points per group and per region checked, status."""
    checks = {t["nodeid"].partition("::")[2]: t.get("checks", t["todo"]) for t in tests}
    regions = regions_of(tests)
    table = []
    for name in sorted(os.listdir(os.path.join(out, "results"))):
        if not name.endswith(".json"):
            continue
        result = previous(os.path.join(out, "results", name))
        if result is None:
            continue
        row = {"student": result.get("extra_data", {}).get("student", name[:-5]), "total": result["score"],
               "max": sum(t["max_score"] for t in result["tests"])}
        for group in GROUPS:
            row[group] = sum(t["score"] for t in result["tests"] if t["name"].startswith("hidden: ") == (group == "hidden"))
        for region in regions:
            row[f"TODO[{region}]"] = sum(t["score"] for t in result["tests"]
                                         if region in checks.get(t["name"].removeprefix("hidden: "), ()))
        row["status"] = result.get("extra_data", {}).get("status", "graded")
        row["seconds"] = result.get("extra_data", {}).get("seconds", "")
        table.append(row)
    return table, ["student", "total", "max", *GROUPS, *(f"TODO[{r}]" for r in regions), "status", "seconds"]


def write_csv(out, tests):
    table, columns = rows(out, tests)
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: f"{v:g}" if isinstance(v, float) else v for k, v in row.items()})
    atomic_write(os.path.join(out, "grades.csv"), text.getvalue())
    return table


# ----------------------------------------------------------------------------- the command

def add_arguments(parser):
    parser.add_argument("submissions", help="a folder with one folder per student, or an LMS bulk download (zip)")
    parser.add_argument("--out", required=True, help="the class's folder: results, feedback, grades.csv, report")
    parser.add_argument("--jobs", type=int, default=max(1, len(os.sched_getaffinity(0)) // 2),
                        help="submissions graded at once (default: half the cores; each grading uses about two)")
    parser.add_argument("--shard", metavar="I/N", help="grade only every N-th student from the I-th (0-based): one "
                                                       "task of a Slurm array; --merge writes grades.csv afterwards")
    parser.add_argument("--merge", action="store_true", help="grade nothing: grades.csv and the report from the "
                                                             "results already in --out")
    for option in ("--timeout", "--total-timeout"):
        parser.add_argument(option, type=float, help="as for `instructor grade`")
    parser.add_argument("--jail-user", help="as for `instructor grade`")
    parser.add_argument("--not-tamper-proof", dest="sealed", action="store_false", help="as for `instructor grade`")


def shard_of(text):
    match = re.fullmatch(r"(\d+)/(\d+)", text or "0/1")
    if not match or int(match.group(1)) >= int(match.group(2)):
        raise grade.GradeError(f"--shard {text}: give I/N with 0 <= I < N, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def grade_options(args):
    return [*(["--timeout", str(args.timeout)] if args.timeout else []),
            *(["--total-timeout", str(args.total_timeout)] if args.total_timeout else []),
            *(["--jail-user", args.jail_user] if args.jail_user else []),
            *([] if args.sealed else ["--not-tamper-proof"])]


def prepare_out(out):
    """DIR/pristine (the graders' files, built from this repository) and DIR/tests.json (the graded tests), made
    by one process at a time (the tasks of a Slurm array start together)."""
    import fcntl

    with open(os.path.join(out, ".prepare.lock"), "w") as lock:
        with contextlib.suppress(OSError):  # a file system without locks (Lustre without -o flock): go on
            fcntl.flock(lock, fcntl.LOCK_EX)
        return prepared(out)


def prepared(out):
    pristine = os.path.join(out, "pristine")
    files = release.pristine_files(release.student_files())
    tests_path = os.path.join(out, "tests.json")
    fresh = {p: data for p, (data, _) in files.items()}
    current = {}
    for p in fresh:
        with contextlib.suppress(OSError), open(os.path.join(pristine, p), "rb") as f:
            current[p] = f.read()
    if current != fresh or not os.path.exists(tests_path):
        shutil.rmtree(pristine, ignore_errors=True)
        release.write_tree(files, pristine)
        atomic_write(tests_path, json.dumps(grade.collect(pristine), indent=1))
    with open(tests_path, encoding="utf-8") as f:
        return pristine, json.load(f)


def run(args):
    from tqdm import tqdm

    from instructor import class_report

    index, count = shard_of(args.shard)
    for folder in ("results", "feedback", "submissions"):
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    pristine, tests = prepare_out(args.out)
    if not args.merge:
        students, ignored = intake(args.submissions, grade.student_modules(pristine))
        if ignored:
            print(f"not a student's files, ignored: {', '.join(ignored[:10])}"
                  + (f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""), file=sys.stderr)
        taken = set()
        named = {safe_name(s, taken): v for s, v in sorted(students.items())}
        mine = dict(sorted(named.items())[index::count])
        start = time.monotonic()
        with tqdm(total=len(mine), unit="student", desc="grading", dynamic_ncols=True) as bar:
            graded = grade_students(mine, args.out, pristine, tests, grade_options(args), args.jobs, bar)
        if graded:
            seconds = time.monotonic() - start
            print(f"graded {graded} students in {seconds:.0f} s: {seconds / graded:.2f} s per student with "
                  f"--jobs {args.jobs} on {os.cpu_count()} cores")
        if count > 1:
            print(f"shard {index}/{count}: {len(mine)} students graded into {args.out}/results; "
                  f"`--merge` writes grades.csv and the report once every shard is done")
            return 0
    table = write_csv(args.out, tests)
    class_report.write(args.out, tests)
    print(f"{len(table)} students: {args.out}/grades.csv, {args.out}/report.md")
    return 0


def main(args):
    try:
        return run(args)
    except grade.GradeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nstopped by Ctrl-C: the results written so far are in {args.out}/results; run the same command "
              f"again to grade the rest", file=sys.stderr)
        return 130
