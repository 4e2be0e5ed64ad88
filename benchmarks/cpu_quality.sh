#!/usr/bin/env bash
# Quality on CPU: train the documented quick CPU configuration (cfg.CPU_QUICK_RUN, also in `train.py --help`
# and the README) on tiny shakespeare and print the best validation loss and the wall time of the whole
# training run (startup, evaluations and samples included).
# Target on a 2-core machine with avx512_bf16: validation loss <= 1.70 within 100 s. Peers measured on the
# same machine: nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations)
# 1.886 in 100 s; nanoGPT patched for bf16 autocast, 3 layers / 4 heads / 192 wide, block 96, batch 16,
# lr 3e-3, 1600 iterations: 1.691 in 109 s.
#
#   benchmarks/cpu_quality.sh                                 # trains into a new temporary folder
#   OUT_DIR=runs/cpu-quick benchmarks/cpu_quality.sh --seed 2 # extra flags override the recipe
#
# Environment: TXT_FILE (default ../shared/data/tinyshakespeare.txt, relative to the repository root),
# OUT_DIR (default: a new temporary folder), PYTHON (default: python). On a CPU without native bf16, add
# --precision fp32 (slower: expect a higher loss in the same time).
set -euo pipefail
cd "$(dirname "$0")/.."
TXT_FILE=${TXT_FILE:-../shared/data/tinyshakespeare.txt}
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
PYTHON=${PYTHON:-python}
RECIPE=$("$PYTHON" -c "from cfg import CPU_QUICK_RUN; print(CPU_QUICK_RUN)")
# shellcheck disable=SC2086  # the recipe is a list of flags
set -- --txt_file "$TXT_FILE" --out_dir "$OUT_DIR" --no-resume $RECIPE --log_interval 50 \
    --checkpoint_interval 100000 "$@"
# OpenMP threads that spin between operations instead of sleeping: about 5% faster steps for a model this
# small (its operations are short), at the price of idle cores showing busy
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-ACTIVE}
echo "OMP_WAIT_POLICY=$OMP_WAIT_POLICY python train.py $*"

start=$(date +%s%N)
"$PYTHON" train.py "$@"
end=$(date +%s%N)
best=$("$PYTHON" -c "import sys, torch; print(f\"{torch.load(sys.argv[1], weights_only=True)['best_val_loss']:.4f}\")" \
       "$OUT_DIR/best.pt")
ms=$(( (end - start) / 1000000 ))
printf 'best val loss %s | wall time %d.%01d s | run folder %s\n' "$best" $((ms / 1000)) $((ms % 1000 / 100)) "$OUT_DIR"
