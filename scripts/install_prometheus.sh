#!/usr/bin/env bash
# Make sure the real Prometheus, Pushgateway and promtool binaries exist (Debian packages).
# The integration tests start them on free 127.0.0.1 ports and stop them by PID.
set -euo pipefail
have() { command -v prometheus >/dev/null && command -v promtool >/dev/null \
         && command -v prometheus-pushgateway >/dev/null; }
if have; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing prometheus and prometheus-pushgateway (Debian packages)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-pushgateway >/dev/null
  have && exit 0
fi
echo "Prometheus binaries missing: run 'sudo apt-get install -y prometheus prometheus-pushgateway'" >&2
echo "(the metrics integration tests need them; in CI they fail without them)" >&2
[ -n "${CI:-}" ] && exit 1 || exit 0
