# shellcheck shell=bash
# run_resumable: run the training so that it survives time limits and preemption.
# The training job scripts (train.job, train_multigpu.job, train_multinode.job) read this file with
# `source slurm/resumable.sh` and end with `run_resumable COMMAND...`. It is not a job by itself.
#
# What happens when the time is nearly up (the signal flow):
#   1. Slurm sends this batch script SIGUSR1 120 s before the time limit (#SBATCH --signal=B:USR1@120;
#      "B:" = only the batch script), or SIGTERM when the job is preempted or cancelled.
#   2. The trap below catches it and asks the training to stop: stop_training sends it SIGTERM.
#   3. train.py finishes its current step, writes last.pt and exits with code 75 (cfg.EXIT_INTERRUPTED).
#   4. This script puts the job back into the queue: `scontrol requeue`. When the job runs again it has
#      the same job id, hence the same run folder, and train.py continues from last.pt where it stopped.
# A training that ends by itself ends the job with its own exit status (0: done; 1, 2: see train.py).

EXIT_INTERRUPTED=75   # train.py's exit code when it stopped on a signal after writing last.pt (cfg.py)
training_pid=""       # the process id of the training, once run_resumable has started it
caught_signal=""      # the signal Slurm sent this script, if any (USR1 or TERM)
wait_interrupted=""   # set when a signal arrives while the script waits for the training
via_srun=""           # set by run_resumable --srun: the training runs as srun steps

# How the training is asked to stop. Usually: SIGTERM to the process that run_resumable started. train.py
# treats SIGTERM like SIGUSR1, and torchrun passes SIGTERM on to each of its train.py processes (SIGUSR1 it
# passes on only in recent versions and when told to, --signals_to_handle; otherwise it dies of it, leaving
# its train.py processes to be killed without a checkpoint). But srun kills its tasks on SIGTERM, so
# when the training runs under srun (run_resumable --srun ..., train_multinode.job) ask Slurm itself to
# send SIGTERM to every process of the job's srun steps, on every node (each torchrun and each train.py).
stop_training() {
    if [ -n "$via_srun" ]; then
        scancel --signal=TERM "$SLURM_JOB_ID"  # the job's srun steps (not this batch script)
    else
        kill -s TERM "$training_pid" 2>/dev/null   # 2>/dev/null: no message if the training has just ended
    fi
}

# The trap: what runs when Slurm signals this script.
on_signal() {
    caught_signal=$1                           # remember it: the training stopped because we asked
    wait_interrupted=1                         # tell the waiting loop below that `wait` was cut short
    echo "$(date '+%F %T') job ${SLURM_JOB_ID} got SIG$1: the training saves a checkpoint and stops"
    stop_training
}

# run_resumable [--srun] COMMAND [ARGS...]: run the training command, wait for it, requeue the job if it
# was stopped by a signal, and end the job (this function does not return). --srun: COMMAND is srun ...
run_resumable() {
    if [ "$1" = --srun ]; then via_srun=1; shift; fi
    trap 'on_signal USR1' USR1                 # the warning before the time limit (--signal=B:USR1@...)
    trap 'on_signal TERM' TERM                 # preemption, scancel
    "$@" &                                     # start the training in the background, because bash runs
    training_pid=$!                            #   a trap only between commands or inside `wait`
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
        echo "$(date '+%F %T') job ${SLURM_JOB_ID}: training stopped (exit code $status); requeueing the job" \
             "to continue from the checkpoint"
        if scontrol requeue "$SLURM_JOB_ID"; then  # back into the queue; Slurm now ends this run of the job
            exit 0
        fi
        echo "$(date '+%F %T') job ${SLURM_JOB_ID}: could not requeue (cancelled? not --requeue?); to continue," \
             "submit again with the same --out_dir" >&2
        exit "$EXIT_INTERRUPTED"
    fi
    echo "$(date '+%F %T') job ${SLURM_JOB_ID}: training failed with exit code $status (see the .err file)" >&2
    exit "$status"
}
