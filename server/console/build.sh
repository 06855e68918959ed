#!/usr/bin/env bash
# Builds the operator console into dist/, which the server binary embeds (server/src/console.rs).
#
#   bash server/console/build.sh           install the npm packages if needed, type-check, build
#   bash server/console/build.sh --check   the same into a scratch folder; fails when the
#                                          committed dist/ is not what the sources build
#   bash server/console/build.sh --deps    only install the npm packages (the browser tests
#                                          drive Chromium with playwright-core)
#
# Packages come from the npm registry at the versions package-lock.json pins, into
# node_modules/ (ignored); npm's download cache is .cache/npm at the top of the clone.
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-build}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "console: Node.js and npm are needed to build the console (node 20.19 or newer)" >&2
  exit 1
fi
# node_modules is installed again only when the lock file changed since it was.
stamp=node_modules/.modelcast-lock
lock=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$lock" ]; then
  npm ci --cache ../../.cache/npm --prefer-offline --no-audit --no-fund --loglevel=error
  echo "$lock" > "$stamp"
fi
case "$mode" in
  --deps) exit 0 ;;
  build)
    npx tsc --noEmit
    npx vite build --logLevel warn
    echo "console: built dist/ ($(wc -c < dist/assets/console.js) B of script, $(wc -c < dist/assets/console.css) B of style)"
    ;;
  --check)
    npx tsc --noEmit
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    npx vite build --logLevel warn --outDir "$scratch"
    if ! diff -r "$scratch" dist >/dev/null; then
      diff -r "$scratch" dist | head -5 >&2 || true
      echo "console: dist/ is not what the sources build: run bash server/console/build.sh and commit dist/" >&2
      exit 1
    fi
    echo "console: dist/ is what the sources build"
    ;;
  *) echo "usage: build.sh [--check|--deps]" >&2; exit 2 ;;
esac
