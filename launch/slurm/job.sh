# Shared by launch/slurm/*.sbatch (sourced from the repository root, bash >= 4.2): how a job finds sft, its master,
# and how it stops, requeues and resumes.
#
# * sft: every rank runs "$SFT_VENV/bin/python -m sft.cli" (SFT_VENV: default .venv) with the repository on
#   PYTHONPATH; nothing else is looked up on PATH.
# * master: the first node of the allocation (MASTER_ADDR), port MASTER_PORT (default 29500). The network interface
#   is chosen on each node as `sft launch` chooses it (launch.network: the one that routes to MASTER_ADDR) and is
#   printed in the job log; SFT_IFACE=NAME overrides it.
# * stop: SIGTERM (scancel, preemption, `scontrol requeue`) reaches every process of the job; each rank records it,
#   all ranks agree at the next optimizer-step boundary, write a complete checkpoint and exit (sft status 75). The
#   launchers between srun and the ranks ignore the signal so that they outlive that checkpoint.
# * early warning: `#SBATCH --signal=B:USR1@SECONDS` sends USR1 to this script that long before the time limit; it is
#   forwarded to the ranks (scancel --signal=USR1), which checkpoint and stop; the script then requeues the job
#   (`scontrol requeue`, needs --requeue).
# * resume: a requeued job (SLURM_RESTART_COUNT > 0) running `train` gets training.resume=auto appended (unless the
#   command sets training.resume), so it continues from the newest complete checkpoint with no edit.

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

export SFT_VENV="${SFT_VENV:-.venv}"
export SFT_PYTHON="$SFT_VENV/bin/python"
if [ ! -x "$SFT_PYTHON" ]; then
  echo "sft job: $SFT_PYTHON not found: submit from the sft repository root, or set SFT_VENV to the virtual" \
       "environment sft is installed in" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-29500}"

# sft_resume_arg ARGS...: "training.resume=auto" for a requeued `train` job whose command does not set training.resume
sft_resume_arg() {
  [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || return 0
  [ "${1:-}" = train ] || return 0
  local a
  for a in "$@"; do
    case "$a" in training.resume=*) return 0;; esac
  done
  echo "training.resume=auto"
}

# sft_run SRUN_ARGS...: srun in the background, so that this script can forward USR1 and wait through SIGTERM.
sft_run() {
  SFT_WARNED=0
  trap 'SFT_WARNED=1; echo "sft job: USR1 (time limit near): the ranks checkpoint and stop, then the job requeues" >&2
        scancel --signal=USR1 "$SLURM_JOB_ID" || true' USR1
  trap 'echo "sft job: SIGTERM: the ranks checkpoint and stop" >&2' TERM
  srun "$@" &
  local pid=$! rc=0
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do  # wait was interrupted by a trapped signal: srun still runs
    rc=0
    wait "$pid" || rc=$?
  done
  trap - USR1 TERM
  if [ "$SFT_WARNED" = 1 ]; then
    echo "sft job: requeueing job $SLURM_JOB_ID (srun exit $rc); it resumes with training.resume=auto" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}
