#!/usr/bin/env bash
# Runs the public TUF conformance suite against modelcast's TUF verifier.
#
#   tests/tuf-conformance.sh [extra pytest arguments, e.g. -k test_root_rotation]
#
# The suite is expected beside the repository, in ../shared/tuf-conformance (as CI lays it
# out). It is copied to a scratch directory (its virtual environment never lands in shared/),
# installed there with pip, and pointed at the client built from this workspace,
# agent/src/bin/modelcast-tuf-client.rs. Installs faketime with apt-get if it is missing.
# Exits non-zero if any test fails. Expected failures, if any, are listed in
# <client>.xfails beside the client binary (copied from tests/tuf-conformance.xfails).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
suite="$repo/../shared/tuf-conformance"
if [[ ! -d "$suite" ]]; then
    echo "tuf-conformance: suite not found at $suite" >&2
    exit 2
fi

if ! command -v faketime >/dev/null 2>&1; then
    echo "tuf-conformance: installing faketime" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null
fi

echo "tuf-conformance: building the client" >&2
(cd "$repo" && cargo build --locked -q -p modelcast-agent --bin modelcast-tuf-client)
target_dir="$(cd "$repo" && cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
client="$target_dir/debug/modelcast-tuf-client"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$suite" "$work/"
chmod -R u+w "$work"
cd "$work/tuf-conformance"

echo "tuf-conformance: installing the suite in a virtual environment" >&2
python3 -m venv env
./env/bin/pip install -q -e .

# The entrypoint and its .xfails file sit together in the scratch directory.
cp "$client" "$work/modelcast-tuf-client"
if [[ -f "$repo/tests/tuf-conformance.xfails" ]]; then
    cp "$repo/tests/tuf-conformance.xfails" "$work/modelcast-tuf-client.xfails"
fi

status=0
./env/bin/pytest tuf_conformance --entrypoint "$work/modelcast-tuf-client" -q -p no:cacheprovider \
    "$@" >"$work/pytest.log" 2>&1 || status=$?
# The failures' details, then pytest's summary line.
grep -E '^(FAILED|ERROR|XPASS)' "$work/pytest.log" || true
tail -n 1 "$work/pytest.log"
if [[ $status -ne 0 ]]; then
    echo "tuf-conformance: FAILED (pytest exit status $status); end of the log follows" >&2
    tail -n 300 "$work/pytest.log" >&2
fi
exit "$status"
