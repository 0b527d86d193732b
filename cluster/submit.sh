#!/usr/bin/env bash
# Submit a training run to the Ray cluster as a job. The working directory (code and configs/) travels
# with the job; run folders and caches stay out of it (see cluster/runtime_env.yaml).
# Usage: cluster/submit.sh CONFIG [key=value ...]
set -euo pipefail
CONFIG="${1:?usage: cluster/submit.sh CONFIG [key=value ...]}"; shift
cd "$(dirname "$0")/.."
exec ray job submit --address "${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
  --runtime-env cluster/runtime_env.yaml -- python -m student.train --config "$CONFIG" "$@"
