#!/usr/bin/env bash
# Run alignlib jobs on a one-machine Ray cluster, the same way they run on a
# real one: a head node with the job API, and `alignlib run` submitted as a
# Ray job (so ray.init() inside alignlib attaches to this cluster).
#
#   cluster/local.sh start [extra `ray start` flags, e.g. --num-gpus 1]
#   cluster/local.sh submit JOB.yaml [key=value ...]
#   cluster/local.sh stop
set -euo pipefail

ADDRESS="http://127.0.0.1:8265"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY="${RAY:-ray}"   # e.g. RAY=.venv/bin/ray

usage() {
  cat >&2 <<EOF
usage: cluster/local.sh start [ray start flags...]
       cluster/local.sh submit JOB.yaml [key=value ...]
       cluster/local.sh stop

  start   start a local Ray head; dashboard and job API on $ADDRESS
  submit  run 'alignlib run JOB.yaml [key=value ...]' as a Ray job on it
          (JOB.yaml is a path inside the repo, e.g. jobs/demo.yaml)
  stop    stop every Ray process of this user on this machine
EOF
  exit 2
}

need_ray() {
  command -v "$RAY" >/dev/null 2>&1 || {
    echo "local.sh: '$RAY' not found; install alignlib (pip install .) or set RAY=/path/to/ray" >&2
    exit 1
  }
}

# Ray 2.60 protects the job API with a token (~/.ray/auth_token) once one exists, but the
# `ray job` client sends it only in token mode: keep server and client in the same mode.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# As alignlib.raydata.RAY_DEFAULTS: Ray Train checks its workers every 0.5 s, not 2 s (a run returns sooner).
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}"

[[ $# -ge 1 ]] || usage
cmd="$1"
shift

case "$cmd" in
  start)
    need_ray
    # Jobs run `python -m alignlib` from the PATH of these Ray processes; put the
    # venv that holds this ray (and alignlib) first so RAY=.venv/bin/ray just works.
    PATH="$(dirname "$(command -v "$RAY")"):$PATH"
    export PATH
    # Dashboard bound to loopback only: the job API runs arbitrary commands.
    "$RAY" start --head --dashboard-host 127.0.0.1 --dashboard-port 8265 \
      --disable-usage-stats "$@"
    echo
    echo "alignlib: local Ray cluster is up; dashboard and job API at $ADDRESS"
    echo "alignlib: submit with  cluster/local.sh submit jobs/demo.yaml"
    ;;
  submit)
    [[ $# -ge 1 ]] || usage
    job="$1"
    shift
    # The job runs inside a copy of the repo, so the spec must be a repo path.
    job="${job#./}"
    if [[ "$job" = /* || ! -f "$ROOT/$job" ]]; then
      echo "local.sh: $job is not a job spec inside $ROOT (try jobs/demo.yaml)" >&2
      exit 1
    fi
    # A relative output_dir would land inside Ray's temporary copy of the repo,
    # so default it to an absolute path under the repo's runs/.
    overrides=("$@")
    if [[ " ${overrides[*]-} " != *" output_dir="* ]]; then
      name="$(basename "$job")"
      overrides+=("output_dir=$ROOT/runs/${name%.*}")
    fi
    need_ray
    # --working-dir ships the repo (code, jobs/) to the cluster and runs the
    # entrypoint from that copy; runtime_env excludes keep the local .venv,
    # past runs/ and .git out of the upload, which is size-limited.
    "$RAY" job submit --address "$ADDRESS" --working-dir "$ROOT" \
      --runtime-env-json '{"excludes": [".venv/", "runs/", ".git/"]}' \
      -- python -m alignlib run "$job" "${overrides[@]}"
    ;;
  stop)
    need_ray
    "$RAY" stop
    ;;
  *)
    usage
    ;;
esac
