# shellcheck shell=bash
# ==================================================================================================
#  YOUR SITE (part 2 of 2): the software environment of the jobs.
#  Every job script in slurm/ reads this file (`source slurm/site.sh`), so this is the one place to
#  set up Python for your cluster. Part 1, the #SBATCH lines for partition, account, GPUs and time,
#  sits at the top of each job script.
# ==================================================================================================

# 1. Modules. Most clusters provide Python, CUDA and compilers as "environment modules": `module avail`
#    lists them, and your cluster's documentation names the ones to use. Remove the '#' in front of the
#    two lines below and put in your site's module names, for example on Snellius (SURF):
#        module load 2023 Python/3.11.3-GCCcore-12.3.0
# module purge                     # start from a clean slate: no modules inherited from the login shell
# module load Python/3.11          # the Python your virtual environment was made with

# 2. The Python environment with this project's requirements. Make it once, on the login node, in the
#    repository folder (see the README):
#        python3 -m venv .venv && source .venv/bin/activate && pip install -r requirements.txt
#    Elsewhere? Set VENV when you submit: `VENV=$HOME/venvs/gpt sbatch slurm/train.job`.
VENV="${VENV:-.venv}"                  # the folder of the environment (relative to the repository)
if [ -f "$VENV/bin/activate" ]; then   # it exists: switch to its python, pip and torchrun
    # shellcheck source=/dev/null      # (the path is only known when the job runs)
    source "$VENV/bin/activate"
else                                   # it does not: use the python that the job inherited from your shell
    echo "note: no $VENV/bin/activate; using $(command -v python || echo 'no python: set VENV or load a module')"
fi

# 3. Multi-node jobs only: if processes on different nodes cannot reach each other, your site may need
#    the network interface named, e.g. (ask your support desk which one):
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
