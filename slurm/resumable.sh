# shellcheck shell=bash
# run_resumable: run the training so that it survives time limits and preemption.
# The training job scripts (train.job, train_multigpu.job, train_multinode.job) read this file with
# `source slurm/resumable.sh` and end with `run_resumable COMMAND...`. It is not a job by itself.
#
# What happens when the time is nearly up (the signal flow):
#   1. Slurm sends this batch script SIGUSR1 120 s before the time limit (#SBATCH --signal=B:USR1@120;
#      "B:" = only the batch script). A preemption with a grace time sends it SIGTERM.
#   2. The trap below catches it and asks the training to stop: stop_training sends it SIGUSR1.
#   3. train.py finishes its current step, writes last.pt and exits with code 75 (cfg.EXIT_INTERRUPTED).
#   4. This script puts the job back into the queue: `scontrol requeue`. When the job runs again it has
#      the same job id, hence the same run folder, and train.py continues from last.pt where it stopped.
# `scancel 1234`, or a preemption that requeues the job at once, signals every process of the job with
# SIGTERM: train.py writes last.pt all the same, and this script leaves the job to Slurm (step 4 would
# bring back a job that somebody cancelled). A training that ends by itself ends the job with its own exit
# status (0: done; 1, 2: see train.py).

EXIT_INTERRUPTED=75   # train.py's exit code when it stopped on a signal after writing last.pt (cfg.py)
training_pid=""       # the process id of the training, once run_resumable has started it
launcher=""           # how the training runs: srun (steps on every node), torchrun (on this node) or neither
caught_signal=""      # the signal Slurm sent this script, if any (USR1 or TERM)
wait_interrupted=""   # set when a signal arrives while the script waits for the training
# On SIGTERM (scancel, preemption) torchrun passes it on and SIGKILLs its train.py processes 30 s later, or
# after this many seconds in recent versions: let Slurm's grace time (KillWait, GraceTime) be the limit.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

# How the training is asked to stop: SIGUSR1 to each train.py process, and to nothing else. Not SIGTERM to
# torchrun, which would pass it on and SIGKILL its train.py processes 30 s later, too soon for a large
# checkpoint; not SIGTERM to srun, which would end its tasks. The training is started with SIGUSR1 ignored
# (see run_resumable) and train.py installs its own handler, so torchrun and srun stay deaf to it.
stop_training() {
    case "$launcher" in
        srun)     scancel --signal=USR1 "$SLURM_JOB_ID" ;;  # every process of the job's srun steps, every node
        torchrun) pkill -USR1 -P "$training_pid" ;;         # the train.py processes that torchrun started
        *)        kill -s USR1 "$training_pid" 2>/dev/null ;;  # no message if the training has just ended
    esac
}

# The trap: what runs when Slurm signals this script.
on_signal() {
    caught_signal=$1                           # remember it: the training stopped because we asked
    wait_interrupted=1                         # tell the waiting loop below that `wait` was cut short
    echo "$(date '+%F %T') job ${SLURM_JOB_ID} got SIG$1: the training saves a checkpoint and stops"
    # SIGTERM: Slurm signals every process of the job by itself (and a scancel now would wait for the job's end)
    if [ "$1" = USR1 ]; then stop_training; fi
}

# run_resumable [--srun] COMMAND [ARGS...]: run the training command, wait for it, requeue the job if it
# was stopped by a signal, and end the job (this function does not return). --srun: COMMAND is srun ...
run_resumable() {
    launcher=$(basename -- "$1")
    if [ "$1" = --srun ]; then launcher=srun; shift; fi
    trap 'on_signal USR1' USR1                 # the warning before the time limit (--signal=B:USR1@...)
    trap 'on_signal TERM' TERM                 # preemption, scancel
    (trap '' USR1; exec "$@") &                # the training in the background, because bash runs a trap only
    training_pid=$!                            #   between commands or inside `wait`; SIGUSR1 ignored: above
    local status previous=""
    while true; do
        wait_interrupted=""
        wait "$training_pid"                   # wait until the training ends ...
        status=$?
        # ... but `wait` also returns early (status > 128) when a trapped signal arrives, while the training
        # still runs (writing its checkpoint): then wait again, until it has really ended. (127: `wait`
        # had already collected the training's exit status the time before, so that one was the real one.)
        if [ "$status" -eq 127 ] && [ -n "$previous" ]; then status=$previous; break; fi
        if [ -z "$wait_interrupted" ] || [ "$status" -le 128 ]; then break; fi
        previous=$status
    done
    trap '' USR1 TERM                          # from now on ignore signals (a requeue sends us SIGTERM)

    if [ "$status" -eq 0 ]; then               # the training finished
        echo "$(date '+%F %T') job ${SLURM_JOB_ID}: training done"
        exit 0
    fi
    # Stopped by a signal: train.py says so with exit code 75. torchrun reports its processes' 75 as a
    # plain failure, hence the second test: a signal came, and the training ended without finishing.
    if [ "$status" -eq "$EXIT_INTERRUPTED" ] || [ -n "$caught_signal" ]; then
        local state
        state=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*')
        if [ "$state" != JobState=RUNNING ]; then  # Slurm is ending the job (COMPLETING): scancel, preemption
            echo "$(date '+%F %T') job ${SLURM_JOB_ID}: training stopped (exit code $status); Slurm ends the job" \
                 "(${state:-JobState unknown}): cancelled, or preempted and requeued by Slurm. To continue a" \
                 "cancelled job, submit it again with the same --out_dir"
            exit "$EXIT_INTERRUPTED"
        fi
        echo "$(date '+%F %T') job ${SLURM_JOB_ID}: training stopped (exit code $status); requeueing the job" \
             "to continue from the checkpoint"
        if scontrol requeue "$SLURM_JOB_ID"; then  # back into the queue; Slurm now ends this run of the job
            exit 0
        fi
        echo "$(date '+%F %T') job ${SLURM_JOB_ID}: could not requeue (not --requeue?); to continue," \
             "submit again with the same --out_dir" >&2
        exit "$EXIT_INTERRUPTED"
    fi
    echo "$(date '+%F %T') job ${SLURM_JOB_ID}: training failed with exit code $status (see the .err file)" >&2
    exit "$status"
}
