"""
A synthetic class, graded with `python -m instructor grade-all`: throughput (seconds per submission) and, with
--compare, every student's total against a one-by-one `python -m instructor grade` of the same files.

The class (seeded): honest students (the solution with a random set of catalogued alternatives), one student
per catalogued mistake (on such an honest base), an empty folder, broken syntax, hostile members of the grading
security zoo (tests/test_grading_security.py), and pairs of duplicates whose second copy has its local names
renamed; all of it delivered as a Canvas bulk download (a flat zip of <name>_<id>_<submission id>_<file>).

    python benchmarks/grade_class.py --out /tmp/class                # about 130 students, --jobs 2
    python benchmarks/grade_class.py --out /tmp/class --honest 5 --mistakes 10 --compare
    python benchmarks/grade_class.py --out /tmp/class --slurm        # then through slurm/grade_class.sh (as root)

--slurm grades the same class again as a job array on the single-node Slurm the tests start
(tests/slurm_cluster.py): --jobs tasks of one core each, then the merge; it prints the time from submitting to
the merged grades.csv and checks that every student has the same total as on one machine.
"""

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from instructor import check, grade_all, mistakes, regions, release  # noqa: E402

MODULES = ("gpt.py", "dataset.py")
HOSTILE = ("patched_helpers", "rng_state_sent_back", "huge_ids", "zombie_leader")  # zoo members, when present
RENAMES = {"chunk": "window", "att": "weights", "mean": "centre", "var": "spread", "logits": "scores_out"}


def solution():
    return {name: open(os.path.join(ROOT, name), encoding="utf-8").read() for name in MODULES}


def entries(kind):
    found = regions.parse_files(MODULES, ROOT)
    mutants, problems = check.catalogue(found)
    assert not problems, problems
    return [m for m in mutants if m.kind == kind]


def honest(rng, alternatives):
    """The solution with a random set of alternatives, at most one per region: students write different code."""
    chosen, used = [], set()
    for m in rng.sample(alternatives, k=min(len(alternatives), rng.randint(3, 12))):
        if m.region not in used:
            chosen.append(m)
            used.add(m.region)
    return chosen


def renamed(files):
    """The same code with some local names renamed (attributes, keywords and strings untouched)."""
    out = {}
    for name, text in files.items():
        for old, new in RENAMES.items():
            text = re.sub(rf"(?<![.\w'\"]){old}\b(?!['\"]|=[^=])", new, text)  # not attributes, keywords, strings
        out[name] = text
    return out


def build(seed, n_honest, n_mistakes, pairs):
    """{student: {module: text} or None (nothing submitted)}."""
    rng = random.Random(seed)
    base, alternatives, catalogued = solution(), entries("alternative"), entries("mistake")
    students = {}
    for i in range(n_honest):
        students[f"honest{i:03d}"] = check.applied(base, honest(rng, alternatives))
    for i, m in enumerate(catalogued[:n_mistakes]):
        others = [a for a in honest(rng, alternatives) if a.region != m.region]
        students[f"mistake{i:03d}"] = check.applied(base, others + [m])
    for i in range(pairs):
        original = check.applied(base, honest(rng, alternatives))
        students[f"original{i}"], students[f"copier{i}"] = original, renamed(original)
    students["empty"] = None
    students["broken"] = {**base, "gpt.py": base["gpt.py"].replace("def forward(self, x):", "def forward(self, x)", 1)}
    try:
        from test_grading_security import HOSTILE as ZOO, submission_files
    except ImportError:
        ZOO = {}
    for case in HOSTILE:
        if case in ZOO:
            built = release_folder()
            try:
                students[f"zoo{case.replace('_', '')}"] = submission_files(built, case, {})
            except (KeyError, TypeError):
                pass
    return students


_RELEASE = None


def release_folder():
    """The student release (the zoo's members are written on top of it), built once."""
    global _RELEASE
    if _RELEASE is None:
        import pathlib
        import tempfile
        _RELEASE = pathlib.Path(tempfile.mkdtemp(prefix="release-"))
        release.build(str(_RELEASE))
    return _RELEASE


def canvas_zip(students, path):
    """The class as Canvas' bulk download: <name>_<id>_<submission id>_<file>, flat."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for number, (student, files) in enumerate(sorted(students.items()), start=1000):
            for name, text in (files or {}).items():
                z.writestr(f"{student}_{number}_{number * 7}_{name}", text)
            if files is None:
                z.writestr(f"{student}_{number}_{number * 7}_notes.txt", "I ran out of time")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--out", required=True, help="a new folder: the class zip and grade-all's output")
    parser.add_argument("--honest", type=int, default=15)
    parser.add_argument("--mistakes", type=int, default=len(mistakes.MISTAKES))
    parser.add_argument("--pairs", type=int, default=3, help="pairs of duplicates (one renamed)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="also grade each student alone and compare totals")
    parser.add_argument("--slurm", action="store_true", help="also grade the class as a Slurm job array")
    parser.add_argument("--grade-options", default="", help="passed on to grade-all and grade, e.g. --not-tamper-proof")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    students = build(args.seed, args.honest, args.mistakes, args.pairs)
    archive = os.path.join(args.out, "canvas.zip")
    canvas_zip(students, archive)
    print(f"{len(students)} students in {archive}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "instructor", "grade-all", archive, "--out", os.path.join(args.out, "graded"),
                    "--jobs", str(args.jobs), *args.grade_options.split()], cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    print(f"grade-all --jobs {args.jobs}: {seconds:.0f} s for {len(students)} students = "
          f"{seconds / len(students):.2f} s per submission ({os.cpu_count()} cores)")
    if args.compare:
        compare(students, args)
    if args.slurm:
        on_slurm(archive, args)


def totals(path):
    import csv

    with open(path, encoding="utf-8") as f:
        return {row["student"]: float(row["total"]) for row in csv.DictReader(f)}


def on_slurm(archive, args):
    """The class through slurm/grade_class.sh: an array of --jobs one-core tasks, then the merge."""
    from slurm_cluster import SlurmCluster  # tests/slurm_cluster.py

    out, logs = os.path.join(args.out, "slurm"), os.path.join(args.out, "slurm-logs")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(logs, exist_ok=True)
    with SlurmCluster() as cluster:
        env = dict(cluster.env, PATH=os.path.dirname(sys.executable) + os.pathsep + cluster.env["PATH"],
                   VENV=sys.prefix)
        start = time.perf_counter()
        submitted = subprocess.run(["bash", "slurm/grade_class.sh", f"--array=0-{args.jobs - 1}", "--partition=cpu",
                                    "--cpus-per-task=1", f"--output={logs}/%x-%j.out", f"--error={logs}/%x-%j.err",
                                    archive, out, *args.grade_options.split()], cwd=ROOT, env=env,
                                   capture_output=True, text=True, check=True)
        merge = re.search(r"^job (\d+) then writes", submitted.stdout, re.M).group(1)
        info = cluster.wait_state(merge, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=7200, interval=1)
        seconds = time.perf_counter() - start
        assert info["JobState"] == "COMPLETED", cluster.diagnostics(merge)  # while the cluster still runs
    here, there = totals(os.path.join(args.out, "graded", "grades.csv")), totals(os.path.join(out, "grades.csv"))
    differ = sorted(s for s in here if here[s] != there.get(s))
    print(f"Slurm array of {args.jobs} one-core tasks, then the merge: {seconds:.0f} s for {len(there)} students = "
          f"{seconds / len(there):.2f} s per submission (submit to merged report); "
          + ("every total as on one machine" if not differ and len(here) == len(there) else f"differ: {differ}"))


def compare(students, args):
    import json
    import tempfile

    graded = totals(os.path.join(args.out, "graded", "grades.csv"))
    differ = []
    for student, files in sorted(students.items()):
        number = 1000 + sorted(students).index(student)
        key = grade_all.safe_name(f"{student}_{number}", set())
        with tempfile.TemporaryDirectory() as folder:
            for name, text in (files or {}).items():
                with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                    f.write(text)
            out = os.path.join(folder, "results.json")
            subprocess.run([sys.executable, "-m", "instructor", "grade", folder, "--out", out,
                            *args.grade_options.split()], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            alone = json.load(open(out))["score"] if os.path.exists(out) else 0.0
        if graded.get(key) != alone:
            differ.append((key, graded.get(key), alone))
    print(f"compared {len(students)} students with one-by-one grading: "
          + ("all the same" if not differ else f"{len(differ)} differ: {differ}"))
    shutil.rmtree(release_folder(), ignore_errors=True) if _RELEASE else None


if __name__ == "__main__":
    main()
