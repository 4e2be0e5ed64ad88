"""
Instructor commands, run from the repository's root:

    python -m instructor check                      prove the release right (7 steps, OK / FAIL each)
    python -m instructor release                    check, then write dist/student, dist/autograder(.zip)
    python -m instructor grade SUBMISSION [--out results.json] [--timeout 30] [--total-timeout 540]
                                                    [--jail-user NAME] [--not-tamper-proof]
    python -m instructor grade-all SUBMISSIONS --out DIR [--jobs N] [--shard I/N | --merge]
                                                    grade a class (a folder or an LMS zip): grades.csv, report
    python -m instructor reference                  regenerate unittests_ref.pt from the solution
    python -m instructor draws [--draws N] [REGION ...]
                                                    is a catalogue entry's verdict the same on every draw?

Exit status: 0 on success, 1 when check fails, 2 on bad input (one line on stderr, no traceback).
"""

import argparse
import os
import sys
import tempfile

from instructor import check, draws, grade, grade_all, procs, release


def run_check(args):
    return 0 if check.check() else 1


def run_release(args):
    if not check.check():
        print("release not written: check failed", file=sys.stderr)
        return 1
    release.release(args.out)
    print(f"wrote {args.out}/student, {args.out}/autograder and {args.out}/autograder.zip")
    return 0


def run_grade(args):
    """Grade with a pristine folder built from this repository, as the autograder bundle would."""
    procs.become_subreaper()  # what a dead runner leaves behind comes to us, to be killed
    with tempfile.TemporaryDirectory(prefix="pristine-") as pristine:
        release.write_tree(release.pristine_files(release.student_files()), pristine)
        grade.grade(args.submission, pristine, args.out, args.timeout, args.total_timeout, user=args.jail_user,
                    sealed=args.sealed)
    return 0


def run_draws(args):
    try:
        return 0 if draws.draws(args.draws, args.regions) else 1
    except ValueError as e:
        raise release.ReleaseError(str(e)) from None


def run_reference(args):
    sys.path.insert(0, release.ROOT)  # make_reference imports the solution's gpt.py and dataset.py
    from instructor import make_reference

    make_reference.main()
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m instructor", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="prove the release right").set_defaults(run=run_check)
    release_parser = commands.add_parser("release", help="check, then write the student release and autograder")
    release_parser.add_argument("--out", default=os.path.join(release.ROOT, "dist"), help="default: dist/")
    release_parser.set_defaults(run=run_release)
    grade_parser = commands.add_parser("grade", help="grade one submission folder")
    grade.add_arguments(grade_parser)
    grade_parser.set_defaults(run=run_grade)
    class_parser = commands.add_parser("grade-all", help="grade a class: a folder of submissions or an LMS zip")
    grade_all.add_arguments(class_parser)
    class_parser.set_defaults(run=grade_all.main)
    commands.add_parser("reference", help="regenerate unittests_ref.pt").set_defaults(run=run_reference)
    draws_parser = commands.add_parser("draws", help="run the catalogue's entries on many grade-time draws")
    draws_parser.add_argument("--draws", type=int, default=200, help="draws per test (default 200)")
    draws_parser.add_argument("regions", nargs="*", help="only these regions' entries (default: all)")
    draws_parser.set_defaults(run=run_draws)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (grade.GradeError, release.ReleaseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
