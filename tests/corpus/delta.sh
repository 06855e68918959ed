#!/usr/bin/env bash
# What bench-delta needs: zstd and xdelta3 from Debian (the baselines it runs beside
# modelcast), the corpus' Python environment, its model (delta.tsv) and that model's variants
# (variants.py), in .cache/delta/<id>/. Safe to run again (what is there is kept).
# Prints the model's path last.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache="${MODELCAST_CACHE:-$root/.cache}"
need=()
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v xdelta3 >/dev/null 2>&1 || need+=(xdelta3)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
bash "$here/setup.sh" delta.tsv >&2
id=$(grep -v '^#' "$here/delta.tsv" | head -1 | cut -f1)
"$cache/python/bin/python" "$here/variants.py" "$cache/corpus/$id.onnx" "$cache/delta/$id" >&2
echo "$cache/corpus/$id.onnx"
