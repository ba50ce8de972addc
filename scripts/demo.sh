#!/usr/bin/env bash
# `make demo`: the simulator and the gateway on config/demo.yaml, in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."

# The simulator's built-in demo keys; nothing here is a real secret.
export THINNESTAI_API_KEY=thns_sk_demo_0001
export SUPPORT_AGENT_KEY=ak_demo_support_0001

thinnest-gateway simulate --host 127.0.0.1 --port 9000 &
simulator=$!
trap 'kill "$simulator" 2>/dev/null; wait "$simulator" 2>/dev/null || true' EXIT

python - <<'PY'
import time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen("http://127.0.0.1:9000/healthz", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    raise SystemExit("the simulator did not start on 127.0.0.1:9000 (is the port taken?)")
PY

cat <<'TXT'

  thinnest-gateway demo: simulator on :9000, gateway on :8080 (Ctrl-C stops both)

  # JSON, as tenant acme (may use ag_support only):
  curl -s http://127.0.0.1:8080/v1/agents/ag_support/chat \
    -H 'Authorization: Bearer gw_demo_acme_billing_key_0001' \
    -H 'Content-Type: application/json' \
    -d '{"message": "What are your business hours?", "session_id": "sess_demo_1"}'

  # Streaming (SSE), same session, so the agent remembers the first turn:
  curl -sN http://127.0.0.1:8080/v1/agents/ag_support/chat \
    -H 'Authorization: Bearer gw_demo_acme_billing_key_0001' \
    -H 'Content-Type: application/json' \
    -d '{"message": "And on Saturdays?", "session_id": "sess_demo_1", "stream": true}'

  # Tenant globex may use any agent, e.g. ag_sales with the platform key:
  curl -s http://127.0.0.1:8080/v1/agents/ag_sales/chat \
    -H 'Authorization: Bearer gw_demo_globex_web_key_0002' \
    -H 'Content-Type: application/json' -d '{"message": "Hello!"}'

TXT
thinnest-gateway serve --config config/demo.yaml
