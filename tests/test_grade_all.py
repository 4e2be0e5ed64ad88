"""`python -m instructor grade-all`: a class from an LMS download, graded each in its own sandbox as `instructor
grade` grades one, in parallel, resumable; refused members reported per student, never fatal."""

import concurrent.futures
import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile

import pytest

from instructor import check, grade_all, regions
from test_grading_security import HOSTILE, HOSTILE_MARK, jail_usable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("gpt.py", "dataset.py")


def solution():
    return {name: open(os.path.join(ROOT, name), encoding="utf-8").read() for name in MODULES}


def with_mistake(index):
    found = regions.parse_files(MODULES, ROOT)
    mutants, _ = check.catalogue(found)
    m = [m for m in mutants if m.kind == "mistake"][index]
    return check.applied(solution(), [m]), m


def the_class():
    """{student: {module: text}}: honest, a catalogued mistake, broken syntax, a hostile member, nothing."""
    base = solution()
    mistaken, _ = with_mistake(0)
    return {
        "honest": base,
        "mistaken": mistaken,
        "broken": {**base, "gpt.py": base["gpt.py"].replace("class MLP(", "class MLP((", 1)},
        "hostile": {**base, "dataset.py": base["dataset.py"] + f"\n{HOSTILE_MARK}\n" + HOSTILE["patched_helpers"]["dataset.py"]},
        "empty": {},
    }


def canvas_zip(path, students, extra=()):
    with zipfile.ZipFile(path, "w") as z:
        for number, (student, files) in enumerate(sorted(students.items()), start=100):
            for name, text in files.items():
                z.writestr(f"{student}_{number}_{number + 5000}_{name}", text)
            if not files:
                z.writestr(f"{student}_{number}_{number + 5000}_readme.txt", "nothing")
        for info, data in extra:
            z.writestr(info, data)


def grade_all_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "instructor", "grade-all", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, **kwargs)


def graders_left(wait=15):
    """The pids of grading processes (the warm process, its gradings and their trusted processes, jails) still
    running after wait seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read()
            except OSError:
                continue
            if b"instructor.warm" in command or b"jailed.py" in command:
                left.append(int(pid))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def grades(out):
    with open(os.path.join(out, "grades.csv"), encoding="utf-8") as f:
        return {row["student"]: row for row in csv.DictReader(f)}


def test_intake_reads_canvas_moodle_and_brightspace_and_refuses_per_student(tmp_path):
    archive = tmp_path / "class.zip"
    link = zipfile.ZipInfo("Carl C_66_assignsubmission_file_/gpt.py")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("Ada Lovelace_12_assignsubmission_file_/micro-gpt/gpt.py", "ada = 1\n")
        z.writestr("Ada Lovelace_12_assignsubmission_file_/notes/gpt.py", "deeper: not taken\n")
        z.writestr("12345-678 - Bea B - Dec 2, 2026 1234 PM/dataset.py", "bea = 1\n")
        z.writestr("Bob B_55_assignsubmission_file_/../../evil/gpt.py", "escape\n")
        z.writestr(link, "/etc/passwd")
        z.writestr("Eve E_77_assignsubmission_file_/gpt.py", "#" * (grade_all.MAX_FILE + 1))
        z.writestr("index.html", "<html>")
    students, ignored = grade_all.intake(str(archive), ["gpt.py", "dataset.py"])
    assert students["Ada Lovelace_12"] == {"gpt.py": b"ada = 1\n"} and students["Bea B"] == {"dataset.py": b"bea = 1\n"}
    assert str(students["Bob B_55"]) == "../../evil/gpt.py leaves its folder"
    assert str(students["Carl C_66"]) == "gpt.py is a link"
    assert str(students["Eve E_77"]) == f"gpt.py is over {grade_all.MAX_FILE:,} bytes"
    assert ignored == ["index.html"]
    # Canvas, unpacked: flat names, _LATE_, a resubmitted file renamed gpt-1.py, a zip the student uploaded
    folder = tmp_path / "canvas"
    folder.mkdir()
    (folder / "lovelace_12_34_gpt-1.py").write_text("again = 1\n")
    (folder / "turing_LATE_7_8_dataset.py").write_text("late = 1\n")
    with zipfile.ZipFile(folder / "hopper_9_10_project.zip", "w") as z:
        z.writestr("project/gpt.py", "zipped = 1\n")
    students, _ = grade_all.intake(str(folder), ["gpt.py", "dataset.py"])
    assert students == {"lovelace_12": {"gpt.py": b"again = 1\n"}, "turing_7": {"dataset.py": b"late = 1\n"},
                        "hopper_9": {"gpt.py": b"zipped = 1\n"}}
    assert grade_all.safe_name("Ada Lovelace_12", set()) == "Ada_Lovelace_12"


@pytest.mark.slow
def test_a_class_is_graded_as_each_alone_resumes_and_survives_ctrl_c(tmp_path):
    why = jail_usable()  # the sandbox, as `instructor grade` uses it (as root, with bubblewrap)
    if why and os.environ.get("MICROGPT_REQUIRE_ROOT") == "1":
        pytest.fail(f"MICROGPT_REQUIRE_ROOT=1 but {why}")
    if why:
        pytest.skip(why)
    students = the_class()
    archive = tmp_path / "canvas.zip"
    slip = zipfile.ZipInfo("../outside.py")
    canvas_zip(archive, students, extra=[(slip, "x = 1\n")])
    out = tmp_path / "graded"
    started = time.monotonic()
    result = grade_all_cli(str(archive), "--out", str(out), "--jobs", "2")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "outside.py").exists() and not (out.parent / "outside.py").exists()
    rows, name = grades(out), {s: f"{s}_{n}" for n, s in enumerate(sorted(students), start=100)}
    assert sorted(rows) == sorted(name.values())

    def grade_alone(student):
        alone = tmp_path / "alone" / student
        alone.mkdir(parents=True)
        for module, text in students[student].items():
            (alone / module).write_text(text)
        return subprocess.run([sys.executable, "-m", "instructor", "grade", str(alone), "--out",
                               str(alone / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # as grade-all --jobs 2 did
        alone = dict(zip(students, pool.map(grade_alone, students)))
    for student, graded in alone.items():
        expected = json.loads((tmp_path / "alone" / student / "results.json").read_text())
        row = rows[name[student]]
        assert float(row["total"]) == expected["score"], (student, row, graded.stderr[-2000:])
        in_class = json.loads((out / "results" / f"{name[student]}.json").read_text())
        # the same inputs drawn (the course's key and the same files): every test's verdict and message the same
        assert [(t["status"], t["output"]) for t in in_class["tests"]] == \
            [(t["status"], t["output"]) for t in expected["tests"]], student
    total = {s: float(rows[name[s]]["total"]) for s in students}
    assert total["honest"] == float(rows[name["honest"]]["max"]) > total["mistaken"] > 0
    assert total["hostile"] < total["honest"] and total["broken"] < total["honest"] and total["empty"] == 0
    for student in rows:
        assert (out / "results" / f"{student}.json").exists() and (out / "feedback" / f"{student}.txt").exists()
    assert (out / "report.md").exists()
    print(f"{len(rows)} students in {took:.0f} s")
    # resumable: nothing changed, nothing graded again
    stamps = {p.name: p.stat().st_mtime for p in (out / "results").iterdir()}
    again = grade_all_cli(str(archive), "--out", str(out), "--jobs", "2")
    assert again.returncode == 0 and {p.name: p.stat().st_mtime for p in (out / "results").iterdir()} == stamps
    # Ctrl-C: results written stay, the rest is graded by the next run
    first, second = out / "results" / f"{name['honest']}.json", out / "results" / f"{name['mistaken']}.json"
    first.unlink()
    second.unlink()
    process = subprocess.Popen([sys.executable, "-m", "instructor", "grade-all", str(archive), "--out", str(out),
                                "--jobs", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not first.exists():
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "stopped by Ctrl-C" in err and "Traceback" not in err, err[-2000:]
    assert json.loads(first.read_text())["score"] == total["honest"] and not second.exists()
    assert not list((out / "results").glob("*.grading"))
    assert not graders_left(), "a grading outlived grade-all's Ctrl-C"
    # grade-all killed outright: its warm process sees its stdin close and kills the gradings still running
    process = subprocess.Popen([sys.executable, "-m", "instructor", "grade-all", str(archive), "--out", str(out),
                                "--jobs", "1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.monotonic() < deadline and not list((out / "results").glob("*.grading")):
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not graders_left(), "a grading outlived grade-all killed with SIGKILL"
    assert not second.exists()
    final = grade_all_cli(str(archive), "--out", str(out), "--jobs", "2")
    def without_time(table):
        return {student: {k: v for k, v in row.items() if k != "seconds"} for student, row in table.items()}
    assert final.returncode == 0 and without_time(grades(out)) == without_time(rows)
    assert not list((out / "results").glob("*.grading")) and not list((out / "results").glob("*.log"))
