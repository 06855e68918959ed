#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The dashboard test drives Debian's Chromium headless.
[ -x /usr/bin/chromium ] || need+=(chromium)
# The storage and postgres tests start PostgreSQL clusters of their own on free ports.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
# Devices fetch chunks over HTTP from a real nginx serving the artifacts (tests/http_download.rs).
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
# Certificate renewal and expiry are tested with the agent's clock moved (libfaketime).
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(faketime)
# A device key kept in a PKCS#11 token: SoftHSM2's.
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
# Prometheus' own checker reads the server's /metrics.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's mosquitto package may start a system broker on 1883; the tests start their own on
# free ports and never use it.
export PATH="$PATH:/usr/sbin"

# The real-model corpus and the Python clients (onnxruntime, tritonclient) its test drives, in
# .cache/ (kept between runs, keyed by version).
need_py=()
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_py+=(python3-venv)
if [ ${#need_py[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_py[@]}" >/dev/null
fi
bash tests/corpus/setup.sh
# The operator console the server embeds: its committed build must be what its sources build,
# and its browser tests drive Chromium with the console's own playwright-core.
bash server/console/build.sh --check

cargo test --workspace --locked "$@"
