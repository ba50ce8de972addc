#!/usr/bin/env bash
# System programs the test suite starts itself (never the machine's own services).
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
# promtool checks the exposition and alert rules; prometheus scrapes the gateway end to end.
command -v promtool >/dev/null || missing+=(prometheus)
# A real forward proxy for the egress tests (tests/test_egress.py starts its own).
command -v tinyproxy >/dev/null || missing+=(tinyproxy)
# curl calls the caller port over TLS (tests/test_tls.py).
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} for the tests" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
