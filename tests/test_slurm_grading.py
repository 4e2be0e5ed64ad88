"""
Grading a class on Slurm: slurm/grade_class.sh submits slurm/grade_class.job as a job array (task I of N runs
`python -m instructor grade-all --shard I/N`) and, depending on it (afterok), the same script with --merge,
which writes grades.csv and the class report.

The quick tests run the two scripts with stand-ins for python, sbatch and scancel: the command lines they
build. The slow one grades a small class on the real single-node Slurm of tests/slurm_cluster.py (as root,
sealed in the sandbox when `nobody` can run this Python, as test_grading_security.py requires) and compares
the merged grades.csv with a one-machine `python -m instructor grade-all` of the same class.
"""

import csv
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

if sys.platform != "linux":  # bash, Slurm and the grading sandbox: the instructor's Linux servers
    pytest.skip("slurm/ grading scripts: Linux only", allow_module_level=True)

from slurm_cluster import SlurmCluster  # tests/slurm_cluster.py  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB, WRAPPER = "slurm/grade_class.job", "slurm/grade_class.sh"
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED")


# ---------------------------------------------------------------------------------------- stand-ins (quick)

END = "@@end-of-call@@"
RECORDER = f'#!/bin/bash\nprintf "%s\\n" "$(basename "$0")" "$@" "{END}" >> "$CALLS"\n'


def calls(path):
    """The recorded calls: [[program, arg, ...], ...]."""
    if not os.path.exists(path):
        return []
    made = [[]]
    for word in open(path).read().split("\n")[:-1]:
        if word == END:
            made.append([])
        else:
            made[-1].append(word)
    return made[:-1]


def stand_ins(tmp_path, **bodies):
    """A bin folder with recording stand-ins: {program: what it does after recording its arguments}."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, body in bodies.items():
        (folder / name).write_text(RECORDER + body + "\n")
        os.chmod(folder / name, 0o755)
    return folder


AS_ROOT = {"id": 'if [ "$1" = -u ]; then echo 0; else echo root; fi', "bwrap": ""}  # root, bubblewrap installed
NOT_ROOT = 'if [ "$1" = -u ]; then echo 1000; else echo alice; fi'


def run_script(tmp_path, script, args, bodies, **env):
    """bash script args in the repository, with stand-ins (as root with bubblewrap unless bodies say otherwise)."""
    folder = stand_ins(tmp_path, **{**AS_ROOT, **bodies})
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    environment.update(PATH=f"{folder}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"),
                       VENV=str(tmp_path / "no-venv"), **env)
    result = subprocess.run(["bash", script, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                            timeout=60)
    return result, [c for c in calls(tmp_path / "calls") if c[0] not in AS_ROOT]  # not the id and bwrap stand-ins


ARRAY_TASK = dict(SLURM_JOB_ID="1237", SLURM_ARRAY_JOB_ID="1234", SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_MIN="4",
                  SLURM_ARRAY_TASK_MAX="7", SLURM_ARRAY_TASK_COUNT="4", SLURM_CPUS_PER_TASK="16")


@pytest.mark.parametrize("case", ["array task", "one job", "merge", "gapped array", "not root", "not root unsealed"])
def test_job_script_runs_grade_all_on_its_shard(tmp_path, case):
    env = {"array task": ARRAY_TASK, "gapped array": dict(ARRAY_TASK, SLURM_ARRAY_TASK_MAX="10")}.get(
        case, dict(SLURM_JOB_ID="1240", SLURM_CPUS_PER_TASK="1"))
    extra = {"merge": ["--merge"], "not root unsealed": ["--not-tamper-proof"]}.get(case, ["--timeout", "60"])
    bodies = {"python": "exit 3"}  # grade-all's exit code becomes the job's
    if case.startswith("not root"):
        bodies["id"] = NOT_ROOT
    result, made = run_script(tmp_path, JOB, ["class", "out dir", *extra], bodies, **env)
    why = result.stdout + result.stderr
    ran = [c[1:] for c in made if c[0] == "python"]
    if case in ("gapped array", "not root"):
        assert result.returncode == 2 and not ran, why
        assert ("range without gaps" if case == "gapped array" else "--not-tamper-proof") in result.stderr, why
        return
    shard = ["--jobs", "16", "--shard", "1/4"] if case == "array task" else ["--jobs", "1"]
    assert ran == [["-m", "instructor", "grade-all", "class", "--out", "out dir", *shard, *extra]], why
    assert result.returncode == 3 and "grade-all exited with code 3" in result.stdout, why
    if case == "array task":
        assert "job 1234_5 (shard 1/4)" in result.stdout, why


def test_wrapper_submits_the_array_then_the_merge_after_it(tmp_path):
    (tmp_path / "class").mkdir()
    sbatch = 'n=$(grep -c "^sbatch$" "$CALLS"); echo "$((100 + n));cluster"'
    result, made = run_script(tmp_path, WRAPPER, ["--partition=short", "--array=0-2", str(tmp_path / "class"), "out",
                                                  "--not-tamper-proof"], {"sbatch": sbatch, "scancel": ""})
    why = result.stdout + result.stderr
    assert result.returncode == 0, why
    tail = ["slurm/grade_class.job", str(tmp_path / "class"), "out", "--not-tamper-proof"]
    assert made == [["sbatch", "--parsable", "--array=0-2", "--partition=short", *tail],
                    ["sbatch", "--parsable", "--cpus-per-task=4", "--output=slurm-%x-%j.out", "--error=slurm-%x-%j.err",
                     "--partition=short", "--job-name=grade-class-merge", "--dependency=afterok:101",
                     "--kill-on-invalid-dep=yes", *tail, "--merge"]], why
    assert "job array 101 " in result.stdout and "job 102 then writes out/grades.csv" in result.stdout, why


@pytest.mark.parametrize("case", ["merge refused", "no submissions", "not root"])
def test_wrapper_refuses_before_or_cancels_what_it_submitted(tmp_path, case):
    (tmp_path / "class").mkdir()
    sbatch = 'if grep -q -- "^--merge$" "$CALLS"; then echo "sbatch: error: bad dependency" >&2; exit 1; fi; echo 101'
    bodies = {"sbatch": sbatch, "scancel": ""}
    if case == "not root":
        bodies["id"] = NOT_ROOT
    submissions = str(tmp_path / ("missing" if case == "no submissions" else "class"))
    result, made = run_script(tmp_path, WRAPPER, [submissions, "out"], bodies)
    why = result.stdout + result.stderr
    if case == "merge refused":
        assert result.returncode == 1 and [c[0] for c in made] == ["sbatch", "sbatch", "scancel"], why
        assert made[2] == ["scancel", "101"] and "job array 101 cancelled" in result.stderr, why
    else:
        assert result.returncode == 2 and made == [], why
        assert ("does not exist" if case == "no submissions" else "--not-tamper-proof") in result.stderr, why


def test_an_empty_student_folder_still_gets_a_row(tmp_path):
    """A student whose folder is empty (a roster made into folders, nothing handed in) must be in grades.csv with
    0, not silently missing; the array tasks shard what grade-all's intake finds, so they inherit its answer."""
    from instructor import grade_all

    for student in ("ada", "fay"):
        (tmp_path / student).mkdir()
    (tmp_path / "ada" / "gpt.py").write_text("x = 1\n")
    students, _ = grade_all.intake(str(tmp_path), ["gpt.py", "dataset.py"])
    assert sorted(students) == ["ada", "fay"]


# ---------------------------------------------------------------------------------------------- real Slurm

def jail_usable():
    """'' when graded student code can be sealed here (root, bubblewrap, `nobody` runs this Python), else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("bwrap") is None:
        return "no bubblewrap"
    probe = subprocess.run([sys.executable, "-c", "import torch"], user="nobody", cwd="/", capture_output=True,
                           text=True, timeout=120)
    return "" if probe.returncode == 0 else f"user nobody cannot run {sys.executable}"


@pytest.fixture(scope="module")
def cluster():
    with SlurmCluster() as c:  # stops every daemon and job process it started, also when a test fails
        yield c


@pytest.fixture(scope="module")
def a_class(tmp_path_factory):
    """Six students: four honest (the solution's modules), one who left the release's gpt.py (its TODOs), one
    who handed in no module (a folder holding only notes.txt). -> (the submissions folder, {student: kind})."""
    from instructor import release

    built = tmp_path_factory.mktemp("release")
    release.build(str(built))
    folder = tmp_path_factory.mktemp("class") / "submissions"
    kinds = {"ada": "honest", "ben": "honest", "cleo": "honest", "dev": "honest", "eve": "stub", "fay": "empty"}
    for student, kind in kinds.items():
        (folder / student).mkdir(parents=True)
        if kind == "empty":
            (folder / student / "notes.txt").write_text("I ran out of time.\n")
        else:
            shutil.copy(os.path.join(ROOT, "dataset.py"), folder / student / "dataset.py")
            source = built / "student" / "gpt.py" if kind == "stub" else os.path.join(ROOT, "gpt.py")
            shutil.copy(source, folder / student / "gpt.py")
    return folder, kinds


def grades(path):
    with open(path, newline="") as f:
        return {row["student"]: row for row in csv.DictReader(f)}


def array_tasks(cluster, array_id):
    """{task index: scontrol's fields} of every task of the job array."""
    lines = cluster.scontrol("show", "job", "-o", array_id).stdout.splitlines()
    tasks = [dict(re.findall(r"(\w[\w:/]*)=(\S*)", line)) for line in lines if line.strip()]
    return {int(t["ArrayTaskId"]): t for t in tasks if t.get("ArrayTaskId", "").isdigit()}


def tail(path, n=4000):
    try:
        with open(path, errors="replace") as f:
            return f"--- {path}\n{f.read()[-n:]}"
    except OSError as e:
        return f"--- {path}: {e.strerror}"


@pytest.mark.slow  # minutes: grades a class twice, on Slurm and on one machine
def test_a_class_graded_by_a_job_array_and_merged_equals_one_machine(cluster, a_class, tmp_path, capsys):
    submissions, kinds = a_class
    logs, out, reference = tmp_path / "logs", tmp_path / "graded", tmp_path / "one-machine"
    logs.mkdir()
    why_not = jail_usable()  # as root here: sealed, as on a server of one's own
    if why_not and os.environ.get("MICROGPT_REQUIRE_ROOT") == "1":
        pytest.fail(f"MICROGPT_REQUIRE_ROOT=1 but the sandbox cannot be used: {why_not}")
    unsealed = ["--not-tamper-proof"] if why_not else []
    env = dict(cluster.env, PATH=os.path.dirname(sys.executable) + os.pathsep + cluster.env.get("PATH", ""))
    if os.path.exists(os.path.join(sys.prefix, "bin", "activate")):
        env["VENV"] = sys.prefix  # what slurm/site.sh activates in the jobs
    # three tasks of one core each (the test node has 2: two at once, then the third), logs in tmp_path
    start = time.monotonic()
    submitted = subprocess.run(["bash", WRAPPER, "--array=0-2", "--partition=cpu", "--cpus-per-task=1",
                                f"--output={logs}/slurm-%x-%j.out", f"--error={logs}/slurm-%x-%j.err",
                                str(submissions), str(out), *unsealed], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    array_id = re.search(r"^job array (\d+) ", submitted.stdout, re.M).group(1)
    merge_id = re.search(r"^job (\d+) then writes", submitted.stdout, re.M).group(1)

    info = cluster.wait_state(merge_id, DONE_STATES, timeout=1200, interval=1)
    on_slurm = time.monotonic() - start
    tasks = array_tasks(cluster, array_id)
    why = "\n".join([cluster.diagnostics(merge_id), *(tail(t["StdOut"]) + "\n" + tail(t["StdErr"], 1500)
                                                      for t in tasks.values())])
    assert sorted(tasks) == [0, 1, 2], why
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks.values()), why
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why

    # the shards: task I took every 3rd student (by name) from the I-th. Each task reports how many it took; they
    # add up to the class, and every student has a result, which only a task writes: so each student was in
    # exactly one shard (disjoint and complete)
    names = sorted(kinds)
    for index, task in tasks.items():
        with open(task["StdOut"], errors="replace") as f:
            text = f.read()
        assert f"(shard {index}/3)" in text, why
        reported = re.search(rf"shard {index}/3: (\d+) students graded", text)
        assert reported and int(reported.group(1)) == len(names[index::3]), why
    results = sorted(n[:-5] for n in os.listdir(out / "results") if n.endswith(".json"))
    assert results == names, why

    # the merge wrote the class's grades.csv and report, as one machine grading the whole class does
    start = time.monotonic()
    one = subprocess.run([sys.executable, "-m", "instructor", "grade-all", str(submissions), "--out", str(reference),
                          "--jobs", "2", *unsealed], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    on_one_machine = time.monotonic() - start
    assert one.returncode == 0, one.stdout + one.stderr[-4000:]
    merged, single = grades(out / "grades.csv"), grades(reference / "grades.csv")
    assert sorted(merged) == sorted(single) == names, why
    for student in names:
        a, b = ({k: v for k, v in row.items() if k != "seconds"} for row in (merged[student], single[student]))
        assert a == b, f"{student}: on Slurm {a}\none machine {b}"
    assert (out / "report.md").is_file(), why
    full = merged["ada"]["max"]
    for student, kind in kinds.items():
        total = float(merged[student]["total"])
        assert (total == float(full)) == (kind == "honest"), f"{student} ({kind}): {merged[student]}"
    with capsys.disabled():  # what the README's times come from
        print(f"\ngrade_class on Slurm ({'unsealed' if unsealed else 'sealed'}): {len(names)} students, 3 tasks of 1 "
              f"core (run times {', '.join(tasks[i]['RunTime'] for i in sorted(tasks))}) + the merge "
              f"({info['RunTime']}): {on_slurm:.0f} s in all; one machine, --jobs 2: {on_one_machine:.0f} s")
