#!/usr/bin/env bash
# Start a one-machine Ray head bound to 127.0.0.1 (every port on loopback), with Ray's metrics export.
# Usage: cluster/start_local_head.sh [NUM_CPUS] ; stop with `ray stop`.
set -euo pipefail
NUM_CPUS="${1:-$(nproc)}"
# Without this Ray picks a non-loopback node address and listens on all interfaces (measured; docs/STACK.md).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
ray start --head --node-ip-address 127.0.0.1 --port "${RAY_PORT:-6379}" \
  --dashboard-host 127.0.0.1 --dashboard-port "${RAY_DASHBOARD_PORT:-8265}" \
  --metrics-export-port "${RAY_METRICS_PORT:-8090}" \
  --num-cpus "$NUM_CPUS" --disable-usage-stats ${RAY_OBJECT_STORE_MEMORY:+--object-store-memory "$RAY_OBJECT_STORE_MEMORY"}
echo "Ray head on 127.0.0.1; submit with: cluster/submit.sh configs/tiny.yaml cluster.num_workers=2"
