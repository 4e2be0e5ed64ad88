#!/usr/bin/env bash
# Quality on CPU: train a preset of train.py (default cpu-speedrun; RECIPE=cpu-quick for the earlier AdamW
# recipe) on tiny shakespeare and print
#   - the full validation loss: the mean over every non-overlapping window of the block size in the held-out
#     last 10% of the text (benchmarks/val_loss.py), the number recipes are compared by;
#   - the run's own estimate (train.py's best val loss, over a fixed random subset of windows);
#   - the wall time of the whole training command (startup, evaluation and the sample included).
# The presets use bf16 on CPUs with native bf16, else fp32 (slower: a higher loss in the same time); the
# README gives the figures measured on 2 cores.
#
#   benchmarks/cpu_quality.sh                                    # trains into a new temporary folder
#   RECIPE=cpu-quick OUT_DIR=runs/cpu-quick benchmarks/cpu_quality.sh --seed 2   # extra flags override it
#
# Environment: RECIPE (a preset name, default cpu-speedrun), TXT_FILE (default ../shared/data/tinyshakespeare.txt,
# relative to the repository root), OUT_DIR (default: a new temporary folder), PYTHON (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-cpu-speedrun}
TXT_FILE=${TXT_FILE:-../shared/data/tinyshakespeare.txt}
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
PYTHON=${PYTHON:-python}
set -- --preset "$RECIPE" --txt_file "$TXT_FILE" --out_dir "$OUT_DIR" --no-resume --log_interval 50 \
    --checkpoint_interval 100000 "$@"
# train.py's own OpenMP default (PASSIVE) unless OMP_WAIT_POLICY is set: benchmarks/omp_wait_policy.py compares
echo "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} python train.py $*"

start=$(date +%s%N)
"$PYTHON" train.py "$@"
end=$(date +%s%N)
estimate=$("$PYTHON" -c "import sys, torch; print(f\"{torch.load(sys.argv[1], weights_only=True)['best_val_loss']:.4f}\")" \
           "$OUT_DIR/best.pt")
full=$("$PYTHON" benchmarks/val_loss.py "$OUT_DIR")
ms=$(( (end - start) / 1000000 ))
printf '%s: full val loss %s | run'"'"'s estimate %s | wall time %d.%01d s | run folder %s\n' "$RECIPE" "$full" \
    "$estimate" $((ms / 1000)) $((ms % 1000 / 100)) "$OUT_DIR"
