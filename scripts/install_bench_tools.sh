#!/usr/bin/env bash
# The load generator of the serving throughput benchmark: wrk (Debian package), a C client
# that costs the shared cores far less than a Python one.
set -euo pipefail
command -v wrk >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing wrk (Debian package)..."
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
  command -v wrk >/dev/null && exit 0
fi
echo "wrk missing: run 'sudo apt-get install -y wrk' (bench_serving_throughput needs it)" >&2
exit 0
