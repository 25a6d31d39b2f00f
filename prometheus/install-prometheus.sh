#!/usr/bin/env bash
# Install Prometheus and promtool from Debian/Ubuntu packages when they are missing (tests and CI need both:
# tests/test_observability.py runs a real Prometheus; promtool checks the config and the alert rules).
# Idempotent: does nothing when both are on PATH. Needs root (apt-get).
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# Where systemd runs, the package also starts a system service on :9090; tests run their own on a free port.
command -v prometheus && command -v promtool
