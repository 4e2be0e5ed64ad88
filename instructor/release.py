"""
The student release and the autograder bundle, built from this repository:

    dist/student/         the repository students receive: every solution region replaced by its stub
    dist/autograder/      Gradescope's bundle: setup.sh, run_autograder, the grader, pristine/ (test files,
                          reference values, hidden tests and the released modules)
    dist/autograder.zip   the same bundle, zipped for upload

Output is deterministic: sorted files, fixed modes, zip entries dated 1980-01-01. `python -m instructor
release` writes it only after `check` passes.
"""

import io
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import zipfile

from instructor import regions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT_MODULES = ("gpt.py", "dataset.py", "cfg.py", "train.py", "optim.py", "generate.py", "pretrained.py",
                   "plot.py", "corpus.py", "files.py")  # released when present
GRADED_FILES = ("unittests.py", "unittests_ref.pt", "conftest.py")  # released and graded as they are
OTHER_FILES = ("requirements.txt", ".gitignore")
FOLDERS = ("slurm", "data", "notebooks")  # what git tracks, or would, in them
INSTRUCTOR_FILES = re.compile(r"^slurm/grade_class\.")  # in those folders, but the instructor's
HIDDEN_TESTS = "instructor/hidden_tests.py"  # graded, never released
GRADER_CODE = ("files.py",) + tuple(f"instructor/{name}.py" for name in
                    ("__init__", "grade", "runner", "remote", "jail", "jailed", "procs", "wire", "make_reference"))
JAIL_USER = "student-code"  # the unprivileged account setup.sh creates on Gradescope
OUTPUTS = ("student", "autograder", "autograder.zip")
KEY_FILE = "instructor/grading.key"  # the course's secret (git-ignored): with a submission's files, its inputs
TORCH_PIN = "torch==2.13.0"

STUDENT_DEV_REQUIREMENTS = "# The graded tests (pytest unittests.py) need only the runtime requirements.\n-r requirements.txt\n"
INSTRUCTOR_ONLY = "<!-- instructor-only -->"
INSTRUCTOR_ONLY_END = "<!-- /instructor-only -->"

SETUP_SH = f"""#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image. It makes a virtual environment
# (VENV, default /opt/micro-gpt-venv: world-readable and outside /autograder and /root, so that the jail user
# can run its Python; made from the system's python3, which PEP 668 keeps pip out of) holding the CPU build of
# torch (TORCH, default {TORCH_PIN}, from TORCH_INDEX, default https://download.pytorch.org/whl/cpu: PyPI's
# is the multi-GB CUDA build) and requirements.txt; installs bubblewrap where `bwrap` is missing; and creates
# the unprivileged account that runs student code (JAIL_USER, default {JAIL_USER}).
# PYTHON=/path/to/python installs into that Python instead (nothing is fetched for what it already has).
set -uo pipefail
umask 022
fail() {{ echo "setup.sh: $*" >&2; exit 1; }}
cd "$(dirname "$0")" || fail "cannot enter the folder of setup.sh"
venv="${{VENV:-/opt/micro-gpt-venv}}"
torch="${{TORCH:-{TORCH_PIN}}}"
index="${{TORCH_INDEX:-https://download.pytorch.org/whl/cpu}}"
user="${{JAIL_USER:-{JAIL_USER}}}"

apt_install() {{
    command -v apt-get >/dev/null 2>&1 || fail "$* missing, and no apt-get here to install it: install it by hand"
    {{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; }} >&2 ||
        fail "apt-get install $* failed (its output is above)"
}}

if [ -n "${{PYTHON:-}}" ]; then
    python="$PYTHON"
    "$python" -c "" 2>/dev/null || fail "PYTHON=$python does not run"
else
    base=/usr/bin/python3
    if [ ! -x "$base" ]; then
        base="$(command -v python3 || true)"
    fi
    if [ -z "$base" ]; then
        apt_install python3 python3-venv
        base=/usr/bin/python3
    fi
    if [ ! -x "$venv/bin/python" ]; then
        if ! "$base" -m venv "$venv" >/dev/null 2>&1; then  # Debian and Ubuntu ship venv's pip apart
            rm -rf "$venv"
            apt_install python3-venv
            "$base" -m venv "$venv" || fail "cannot make a virtual environment in $venv with $base"
        fi
    fi
    python="$venv/bin/python"
fi
"$python" -m pip --version >/dev/null 2>&1 || fail "$python has no pip: install it, or name another Python in PYTHON"
"$python" -m pip install --no-cache-dir --index-url "$index" "$torch" || fail "cannot install $torch from $index"
"$python" -m pip install --no-cache-dir -r requirements.txt || fail "cannot install requirements.txt into $python"
"$python" -c "import torch" || fail "$python cannot import torch after the installation"
if ! command -v bwrap >/dev/null 2>&1; then
    apt_install bubblewrap
fi
command -v bwrap >/dev/null 2>&1 || fail "bubblewrap (bwrap) is still missing after its installation"
id -u "$user" >/dev/null 2>&1 ||
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user" ||
    fail "cannot create the jail user $user"
if [ "$(id -u)" = 0 ]; then  # a trial grading of the released files: the sandbox, the jail user and this Python
    empty="$(mktemp -d)"
    error="$("$python" -m instructor.grade "$empty" --pristine pristine --jail-user "$user" 2>&1 >/dev/null)" ||
        fail "a trial grading failed: ${{error##*error: }}"
    rmdir "$empty"
fi
echo "setup.sh: ready: $python, $("$python" -c "import torch; print('torch', torch.__version__)"), $(command -v bwrap), user $user"
"""

RUN_AUTOGRADER = f"""#!/usr/bin/env bash
# Gradescope runs this for every submission, as root: the pristine graded tests on the files of
# /autograder/submission, points and messages into /autograder/results/results.json. Student code
# runs as JAIL_USER (default {JAIL_USER}, made by setup.sh), which can read nothing of /autograder.
# Limits: --timeout per test, --total-timeout for all (keep it below the assignment's autograder
# timeout, 10 minutes by default, so that results.json is always written).
# To try it elsewhere: AUTOGRADER_DIR (default /autograder, holding source/ and submission/),
# PYTHON (default the Python of setup.sh's virtual environment, VENV, default /opt/micro-gpt-venv),
# JAIL_USER, GRADER_ARGS (replaces the limits below).
set -uo pipefail
root="${{AUTOGRADER_DIR:-/autograder}}"
python="${{PYTHON:-${{VENV:-/opt/micro-gpt-venv}}/bin/python}}"
out="$root/results/results.json"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "run_autograder: no Python at $python: run setup.sh first, or name one in PYTHON" >&2
    exit 1
fi
cd "$root/source" || {{ echo "run_autograder: no folder $root/source (AUTOGRADER_DIR=$root)" >&2; exit 1; }}
mkdir -p "$root/results" || {{ echo "run_autograder: cannot make $root/results" >&2; exit 1; }}
jail=()
if [ "$(id -u)" = 0 ]; then
    chmod -R go-rwx "$root/source" "$root/submission" "$root/results"
    jail=(--jail-user "${{JAIL_USER:-{JAIL_USER}}}")
fi
# shellcheck disable=SC2086
"$python" -m instructor.grade "$root/submission" --pristine pristine --out "$out" "${{jail[@]}}" \\
    ${{GRADER_ARGS:---timeout 30 --total-timeout 540}}
status=$?
if [ ! -s "$out" ]; then  # the grader died before the tests were listed: list them, every one failed
    "$python" -m instructor.grade "$root/submission" --pristine pristine --out "$out" \\
        --failed-report "not graded: the grader stopped (exit code $status) before this test ran"
fi
exit "$status"
"""


class ReleaseError(Exception):
    """A problem in the sources that stops the release, said in one line with file:line."""


def read(path):
    with open(os.path.join(ROOT, path), "rb") as f:
        return f.read()


def mode(path):
    return 0o755 if os.stat(os.path.join(ROOT, path)).st_mode & 0o100 else 0o644


def student_readme(text, path="README.md"):
    """README without the blocks between <!-- instructor-only --> and <!-- /instructor-only --> lines."""
    try:
        found = regions.blocks(text, path, re.compile(rf"^\s*{re.escape(INSTRUCTOR_ONLY)}\s*$"),
                               re.compile(rf"^\s*{re.escape(INSTRUCTOR_ONLY_END)}\s*$"), f"{INSTRUCTOR_ONLY} block")
    except regions.RegionError as e:
        raise ReleaseError(str(e)) from None
    lines = text.splitlines(keepends=True)
    for _, start, end in reversed(found):
        del lines[start - 1:end]
    return "".join(lines)


def student_pytest_ini(text):
    """pytest.ini with `testpaths = unittests.py` (the repository's also runs tests/)."""
    out, in_testpaths = [], False
    for line in text.splitlines():
        if in_testpaths and line[:1] in (" ", "\t"):
            continue  # continuation lines of the old value
        in_testpaths = re.match(r"testpaths\s*=", line) is not None
        out.append("testpaths = unittests.py" if in_testpaths else line)
    if "testpaths = unittests.py" not in out:
        out.insert(out.index("[pytest]") + 1, "testpaths = unittests.py")
    return "\n".join(out) + "\n"


def folder_files(folder):
    """Files under folder that git tracks or would track (untracked but not ignored), sorted."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", folder],
                                cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ReleaseError(f"the release lists {folder}/ with git, which failed ({e}); run it in a git checkout")
    return sorted(p for p in listed.decode().split("\0") if p and os.path.isfile(os.path.join(ROOT, p)))


def released(path, data):
    """A file as released: solution regions of .py files replaced by their stubs."""
    return regions.strip(data.decode("utf-8"), path).encode("utf-8") if path.endswith(".py") else data


def released_paths():
    """The repository's files that go into the student release (as they are, or stripped), sorted."""
    paths = [p for p in STUDENT_MODULES + GRADED_FILES + OTHER_FILES if os.path.isfile(os.path.join(ROOT, p))]
    for folder in FOLDERS:
        paths += [p for p in folder_files(folder) if not INSTRUCTOR_FILES.match(p)]
    return sorted(paths)


def solution_regions():
    """Every solution region of the released .py files; checks the markers (ids unique across files)."""
    try:
        return regions.parse_files([p for p in released_paths() if p.endswith(".py")], ROOT)
    except regions.RegionError as e:
        raise ReleaseError(str(e)) from None


def student_files():
    """The student repository: {path: (bytes, mode)}."""
    solution_regions()  # marker errors first, with file:line
    paths = released_paths()
    files = {p: (released(p, read(p)), mode(p)) for p in paths}
    files["pytest.ini"] = (student_pytest_ini(read("pytest.ini").decode()).encode(), 0o644)
    # the README's test command installs requirements-dev.txt; the graded tests need nothing beyond runtime
    files["requirements-dev.txt"] = (STUDENT_DEV_REQUIREMENTS.encode(), 0o644)
    for readme in ("README.md", "slurm/README.md"):
        if os.path.isfile(os.path.join(ROOT, readme)):
            files[readme] = (student_readme(read(readme).decode(), readme).encode(), 0o644)
    return files


def grading_key():
    """The course's secret key: KEY_FILE, made once with 32 random bytes. The inputs a submission is graded on
    are drawn from it and the submission's files, so the same files get the same grade wherever they are
    graded with this repository's bundle; no student can know them without it. Never commit or publish it."""
    path = os.path.join(ROOT, KEY_FILE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:  # first use: written in one call, so that a process racing this one reads all of it or waits
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
    for _ in range(100):
        key = read(KEY_FILE).strip()
        if len(key) == 64:
            return key
        time.sleep(0.05)
    raise ReleaseError(f"{KEY_FILE} is not 64 hex digits: delete it to make a new key (grades then change)")


def pristine_files(student):
    """The graders' folder of the bundle, from the student files: test files, reference values, hidden
    tests and the released modules (what a submission that lacks one of them is graded with)."""
    names = [p for p in student if p in STUDENT_MODULES + GRADED_FILES + ("pytest.ini",)]
    files = {p: student[p] for p in names}
    if os.path.isfile(os.path.join(ROOT, HIDDEN_TESTS)):
        files["hidden_tests.py"] = (read(HIDDEN_TESTS), 0o644)
    files["reference/gpt.py"] = (read("gpt.py"), 0o600)  # the trusted reference at grade time, root's only
    files["reference/key"] = (grading_key(), 0o600)
    return files


def autograder_files(student):
    """The Gradescope bundle: {path: (bytes, mode)}."""
    files = {"setup.sh": (SETUP_SH.encode(), 0o755), "run_autograder": (RUN_AUTOGRADER.encode(), 0o755),
             "requirements.txt": student["requirements.txt"]}
    files.update({p: (read(p), 0o644) for p in GRADER_CODE})
    files.update({f"pristine/{p}": v for p, v in pristine_files(student).items()})
    return files


def write_tree(files, dest):
    for path in sorted(files):
        data, file_mode = files[path]
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
        os.chmod(target, file_mode)


def zip_bytes(files):
    """A zip of files with fixed dates and modes: the same files give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for path in sorted(files):
            data, file_mode = files[path]
            info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o100000 | file_mode) << 16
            info.create_system = 3  # unix, so that the modes apply
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data, compresslevel=9)
    return buffer.getvalue()


def build(dest):
    """Write the outputs into dest (a new or empty folder)."""
    student = student_files()
    autograder = autograder_files(student)
    write_tree(student, os.path.join(dest, "student"))
    write_tree(autograder, os.path.join(dest, "autograder"))
    with open(os.path.join(dest, "autograder.zip"), "wb") as f:
        f.write(zip_bytes(autograder))
    os.chmod(os.path.join(dest, "autograder.zip"), 0o644)


def release(out=os.path.join(ROOT, "dist")):
    """Build into a temporary folder next to the outputs, then swap each output in with a rename."""
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=out)
    try:
        build(tmp)
        for name in OUTPUTS:
            target = os.path.join(out, name)
            if os.path.lexists(target):
                os.rename(target, os.path.join(tmp, name + ".old"))
            os.rename(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp)
