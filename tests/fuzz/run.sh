#!/usr/bin/env bash
# Fuzzes every decoder of untrusted bytes with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   bash tests/fuzz/run.sh [SECONDS per target, default 600] [TARGET ...]
#
# Installs cargo-fuzz from crates.io if it is missing. The project's toolchain is stable Rust;
# the sanitizer flags cargo-fuzz passes are nightly-only, so RUSTC_BOOTSTRAP=1 lets the stable
# compiler take them (a nightly toolchain works as well: FUZZ_TOOLCHAIN=+nightly).
# Seeds come from src/bin/seeds.rs; what the fuzzer finds stays in corpus/<target> (kept in
# the repository, minimised with `cargo fuzz cmin`). A crash leaves its input in
# artifacts/<target>/ and makes this script exit non-zero.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(envelope desired manifest chunk report telemetry tuf_metadata infer_request store_record)
fi

command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
tc="${FUZZ_TOOLCHAIN:-}"

cargo $tc run --quiet --locked --bin seeds -- corpus
failed=()
for t in "${targets[@]}"; do
  echo "fuzz: $t for ${seconds}s"
  log="$(mktemp)"
  if cargo $tc fuzz run --fuzz-dir . "$t" "corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      >"$log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^Done' "$log" | tr '\n' ' '
    echo "corpus: $(ls "corpus/$t" | wc -l) inputs"
  else
    failed+=("$t")
    tail -n 60 "$log"
  fi
  rm -f "$log"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]} (inputs under tests/fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash"
