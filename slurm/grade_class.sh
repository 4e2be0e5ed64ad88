#!/bin/bash
# slurm/grade_class.sh: grade a whole class on a Slurm cluster with one command. Run it on the login node,
# in the instructor's repository folder:
#
#   slurm/grade_class.sh SUBMISSIONS DIR                        # 4 tasks grade the class, then the merge
#   slurm/grade_class.sh --array=0-7 SUBMISSIONS DIR --not-tamper-proof    # 8 tasks; jobs not run as root
#   slurm/grade_class.sh --partition=short --time=00:30:00 SUBMISSIONS DIR --timeout 60
#
# It submits slurm/grade_class.job twice and prints both job ids: as a job array (--array=0-3 unless you
# give one), whose task I of N grades every N-th student into DIR/results/; then once more with --merge,
# a job that starts when every task has succeeded (afterok; Slurm cancels it when one did not)
# and writes DIR/grades.csv and the class report, as a one-machine `python -m instructor grade-all` does.
# Options before SUBMISSIONS go to sbatch for both jobs (--array to the array only), each written as one
# word: --partition=short, not --partition short. Words after DIR go to grade-all (`python -m instructor
# grade-all --help`). slurm/README.md, "Grading a class", says more.

usage="usage: slurm/grade_class.sh [sbatch options] SUBMISSIONS DIR [grade-all options]"
array=--array=0-3 sbatch_options=()
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) echo "$usage"; exit 0 ;;
        --array=* | -a?*) array=$1 ;;
        -*) sbatch_options+=("$1") ;;
        *) break ;;
    esac
    shift
done
if [ $# -lt 2 ]; then
    echo "$usage" >&2
    exit 2
fi
submissions=$1 out=$2
shift 2                          # "$@": the grade-all options
if [ ! -f instructor/grade_all.py ] || [ ! -f slurm/grade_class.job ]; then
    echo "error: run it from the instructor's repository folder: cd micro-gpt && slurm/grade_class.sh ..." >&2
    exit 2
fi
if [ ! -e "$submissions" ]; then
    echo "error: $submissions does not exist: give a folder of submissions or an LMS zip (sbatch options go" \
         "before it, each as one word: --partition=short)" >&2
    exit 2
fi
sealed=yes
for word in "$@"; do
    case $word in --not-t*) sealed=no ;; esac
done
if [ "$sealed" = yes ] && [ "$(id -u)" != 0 ]; then  # the jobs run as you: they could not make the sandbox
    echo "error: the sandbox that seals student code needs root, and your jobs run as $(id -un): add" \
         "--not-tamper-proof after DIR (slurm/README.md, \"Grading a class\")" >&2
    exit 2
fi

# the array: task I of N grades every N-th student (an --array among the sbatch options wins over ours)
array_id=$(sbatch --parsable "$array" "${sbatch_options[@]}" slurm/grade_class.job "$submissions" "$out" "$@") ||
    { echo "error: sbatch did not take the job array (its message is above)" >&2; exit 1; }
array_id=${array_id%%;*}         # --parsable prints "id" or "id;cluster"
# the merge, after every task succeeded (Slurm cancels it if one failed: kill-on-invalid-dep); 4 cores for the
# class report's checks of the mistakes catalogue, unless the sbatch options say otherwise
merge_id=$(sbatch --parsable --cpus-per-task=4 --output=slurm-%x-%j.out --error=slurm-%x-%j.err "${sbatch_options[@]}" \
    --job-name=grade-class-merge --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
    slurm/grade_class.job "$submissions" "$out" "$@" --merge) ||
    { scancel "$array_id"; echo "error: sbatch did not take the merge job (above); job array $array_id cancelled" >&2; exit 1; }
merge_id=${merge_id%%;*}

echo "job array $array_id grades $submissions into $out/results/ ($array; logs slurm-grade-class-${array_id}_<task>.out)"
echo "job $merge_id then writes $out/grades.csv and $out/report.md (log slurm-grade-class-merge-$merge_id.out)"
echo "watch: squeue --me; if a task fails, Slurm cancels the merge: run the same command again (graded students are skipped)"
