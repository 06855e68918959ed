#!/usr/bin/env bash
# The demo on embedded defaults: a fleet server with its embedded MQTT broker, three agents
# (two in Berlin, one in Paris), a real ONNX model published in two versions, rolled out to
# the Berlin group, with inferences through the KServe v2 API before and after the swap; then
# a third version too slow for the devices, rolled out in two waves: its canary rejects it and
# the rollout aborts and sends it back by itself.
#
#   bash tests/demo.sh          runs it and stops the fleet
#   bash tests/demo.sh --keep   keeps the fleet up afterwards, to open its console in a browser
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
case "${1:-}" in
  --keep) KEEP=1 ;;
  "") ;;
  *) echo "usage: tests/demo.sh [--keep]" >&2; exit 2 ;;
esac

say() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }

say "building (first run compiles tract: several minutes)"
cargo build --locked -q -p modelcast-server -p modelcast-ops -p modelcast-agent --bins
BIN="$PWD/target/debug"

WORK=$(mktemp -d -t modelcast-demo.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API_PORT=$(free_port); MQTT_PORT=$(free_port)
export MODELCAST_SERVER="http://127.0.0.1:$API_PORT"
export MODELCAST_KEYS="$WORK/keys"
mc() { run "$BIN/modelcast" "$@"; }

say "operator: generate keys (root, targets offline; server online) and two model versions"
mc keygen --out "$WORK/keys"
mc example-model --version 1 --out "$WORK/classifier-v1.onnx"
mc example-model --version 2 --out "$WORK/classifier-v2.onnx"
mc example-model --version 3 --out "$WORK/classifier-v3.onnx"

say "start the fleet server with its embedded MQTT broker (127.0.0.1:$MQTT_PORT)"
"$BIN/modelcast-server" --data-dir "$WORK/server" --keys "$WORK/keys" \
  --listen "127.0.0.1:$API_PORT" --mqtt-listen "127.0.0.1:$MQTT_PORT" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do curl -sf "$MODELCAST_SERVER/api/v1/health" >/dev/null && break; sleep 0.2; done

say "start three agents, each with its own sled store and inference port"
declare -A HTTP
start_agent() { # id labels
  local id=$1 labels=$2 port; port=$(free_port); HTTP[$id]=$port
  cat >"$WORK/$id.toml" <<TOML
device_id = "$id"
labels = { $labels }
state_dir = "$WORK/$id"
broker = "mqtt://127.0.0.1:$MQTT_PORT"
http_listen = "127.0.0.1:$port"
[trust]
root = "$WORK/keys/root.json"
director_keys = ["$(cat "$WORK/keys/director.pub")"]
TOML
  "$BIN/modelcast-agent" --config "$WORK/$id.toml" >"$WORK/$id.log" 2>&1 &
  PIDS+=($!)
  echo "  $id  labels: $labels  inference API: http://127.0.0.1:$port/v2"
}
start_agent jetson-1 'site = "berlin", hw = "jetson"'
start_agent jetson-2 'site = "berlin", hw = "jetson"'
start_agent pi-1 'site = "paris", hw = "pi"'
for _ in $(seq 50); do
  [ "$("$BIN/modelcast" devices --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 3 ] && break
  sleep 0.2
done
mc devices

infer() { # device
  local body='{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[0.5,-1.0,2.0,0.25]}]}'
  printf '\033[2m$ curl -s -X POST http://127.0.0.1:%s/v2/models/classifier/infer -d %s\033[0m\n' "${HTTP[$1]}" "$body"
  curl -s -X POST "http://127.0.0.1:${HTTP[$1]}/v2/models/classifier/infer" \
    -H 'content-type: application/json' -d "$body" | python3 -c '
import json, sys
r = json.load(sys.stdin)
if "error" in r: print("  ->", r["error"]); sys.exit()
o = r["outputs"][0]
print("  -> %s v%s  %s = [%s]" % (r["model_name"], r["model_version"], o["name"], ", ".join("%.4f" % v for v in o["data"])))'
}

say "publish v1 (signed with the operators' targets key) and deploy it to site=berlin"
mc publish "$WORK/classifier-v1.onnx" --name classifier --version 1 --meta training_data=demo-synthetic --meta accuracy=0.91
mc deploy --model classifier --version 1 --group site=berlin
mc status --model classifier --version 1 --group site=berlin --timeout 120

say "inference through the KServe v2 API"
infer jetson-1
infer jetson-2
infer pi-1   # not in site=berlin: nothing deployed there

say "publish v2 and deploy it: agents download, verify, stage in the other slot, swap"
mc publish "$WORK/classifier-v2.onnx" --name classifier --version 2 --meta training_data=demo-synthetic --meta accuracy=0.94
mc deploy --model classifier --version 2 --group site=berlin
mc status --model classifier --version 2 --group site=berlin --timeout 120

say "the same request now answers from v2"
infer jetson-1
infer jetson-2

say "what each device reported"
mc models
mc devices
"$BIN/modelcast" devices --json | python3 -c '
import json, sys
for d in json.load(sys.stdin):
    r = d.get("report") or {}
    for name, m in (r.get("models") or {}).items():
        print("  %-9s %s: active slot %s, a=%s, b=%s, update=%s" % (d["id"], name, m["active"],
              (m["a"] or {}).get("version"), (m["b"] or {}).get("version"),
              (m["update"] or {}).get("phase")))'

say "agent log excerpt (jetson-1)"
grep -E "verified|update starts|staging|swapped" "$WORK/jetson-1.log" | sed -E 's/\x1b\[[0-9;]*m//g' | cut -c1-160

say "publish v3 with a p95 budget no device can meet, and roll it out to site=berlin in two waves"
mc publish "$WORK/classifier-v3.onnx" --name classifier --version 3 --p95-budget-ms 0.001 --meta note=too-slow-on-purpose
mc rollout start --model classifier --version 3 --group site=berlin --waves 1,100% --wave-timeout 300 --follow
mc rollout list

say "the canary rejected v3 before the swap; both devices still answer from v2"
infer jetson-1
infer jetson-2

say "the operator console: $MODELCAST_SERVER/dashboard"
echo "  the fleet, each device, model and rollout (rollout $("$BIN/modelcast" rollout list | awk 'END {print $1}'): aborted, its canary sent back)"
if [ "$KEEP" = 1 ]; then
  say "the fleet stays up (--keep): open $MODELCAST_SERVER/dashboard; Ctrl-C stops it"
  wait
fi

say "demo finished"
