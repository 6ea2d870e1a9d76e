#!/usr/bin/env bash
# Submit a pipeline run to a Ray cluster as a Ray job.
#
#   deploy/submit.sh [--no-wait] [--address URL] [--submission-id ID] [--dry-run] [--] DISTILL_RUN_ARGS...
#
# Everything that is not one of the options above goes to `distill run` on the cluster, which is started
# as `python -m workers.cli run ...` so it works from the uploaded working directory even where the
# package is not installed. The run directory must be on storage every node mounts (see deploy/README.md).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: deploy/submit.sh [--no-wait] [--address URL] [--submission-id ID] [--dry-run] [--] DISTILL_RUN_ARGS...

Submits `python -m workers.cli run DISTILL_RUN_ARGS...` as a Ray job, uploading this repository as the
job's working directory with the runtime environment in deploy/ray/runtime_env.yaml.

options (before the distill arguments):
  --no-wait            return once the job is accepted instead of tailing its logs
  --address URL        Ray dashboard / job API (default: $RAY_ADDRESS or http://127.0.0.1:8265)
  --submission-id ID   name the job (unique per cluster: a resubmission needs a new ID)
  --dry-run            print the `ray job submit` command instead of running it
  -h, --help           this message

environment: RAY_ADDRESS (job API address), RAY (the ray executable, default: ray); for a cluster with
  token authentication RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token), read by `ray`

example (through `ray dashboard deploy/cluster/ray-cluster.yaml` or `kubectl port-forward ... 8265`):
  deploy/submit.sh --no-wait -- --recipe imagenet1k-rn18-ipc10-dwa --data-dir /data/imagenet \
      --run-dir /runs/in1k-ipc10-dwa
Follow a job with `ray job logs -f ID`, stop it with `ray job stop ID`. Submitting again with the same
--run-dir resumes the run: finished units are kept.
USAGE
}

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
ray_bin="${RAY:-ray}"
submit_opts=()
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-wait) submit_opts+=(--no-wait); shift ;;
    --address) [[ $# -ge 2 ]] || { echo "submit.sh: --address needs a value" >&2; exit 2; }
               address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --submission-id) [[ $# -ge 2 ]] || { echo "submit.sh: --submission-id needs a value" >&2; exit 2; }
                     submit_opts+=(--submission-id "$2"); shift 2 ;;
    --submission-id=*) submit_opts+=(--submission-id "${1#*=}"); shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  usage >&2
  echo "submit.sh: give the arguments of \`distill run\` (at least --recipe or --config and --run-dir)" >&2
  exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # the repository root is the job's working directory
cmd=("$ray_bin" job submit --address "$address" --working-dir . --runtime-env deploy/ray/runtime_env.yaml
     ${submit_opts[@]+"${submit_opts[@]}"} -- python -m workers.cli run "$@")
if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
