# Sourced by cross/build and cross/test: installs the cross toolchain from Debian's packages
# (idempotent) and defines `cross_cargo TARGET SUBCOMMAND ARGS…`.
#
# The rustup toolchain has only the x86_64 standard library, so ARM builds use Debian's
# rustc-web (1.96) instead: its arm64 std comes prebuilt (libstd-rust-web-dev:arm64); for armv7
# std is built from source (rust-web-src) with -Zbuild-std. See cross/README.md.

AARCH64=aarch64-unknown-linux-gnu
ARMV7=armv7-unknown-linux-gnueabihf

cross_install() {
  local pkgs=(rustc-web cargo-web libstd-rust-web-dev libstd-rust-web-dev:arm64 rust-web-src
              gcc-aarch64-linux-gnu libc6-dev-arm64-cross
              gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user)
  local missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "cross: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # arm64 std comes from Debian's arm64 archive; armhf is deliberately not added (its index
  # was broken on the security mirror; armv7 std is built from source instead).
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

cross_cargo() {
  local target=$1 sub=$2
  shift 2
  # rustup's shims come first on PATH: point cargo at Debian's compiler explicitly.
  export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
  # A target dir of its own: host build scripts compiled by rustc 1.96 must not overwrite
  # those of the native (rustup 1.95) build.
  export CARGO_TARGET_DIR="${CROSS_TARGET_DIR:-$PWD/target/cross}"
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
  # No -L: with it, qemu finds the multiarch libc6:arm64 and the first spawned thread hangs.
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
  export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
  export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
  export AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar
  export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER="qemu-arm -L /usr/arm-linux-gnueabihf"
  case "$target" in
    aarch64) /usr/bin/cargo "$sub" --target "$AARCH64" "$@" ;;
    armv7) RUSTC_BOOTSTRAP=1 /usr/bin/cargo "$sub" --target "$ARMV7" -Zbuild-std=std,panic_unwind "$@" ;;
    *) echo "unknown target $target (aarch64 | armv7)" >&2; return 2 ;;
  esac
}

cross_triple() {
  case "$1" in aarch64) echo "$AARCH64" ;; armv7) echo "$ARMV7" ;; esac
}

cross_runner() {
  case "$1" in aarch64) echo "qemu-aarch64" ;; armv7) echo "qemu-arm -L /usr/arm-linux-gnueabihf" ;; esac
}
