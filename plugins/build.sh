#!/usr/bin/env bash
# Builds every cdp connector plugin as a WebAssembly component and copies it
# to dist/<crate_name>.wasm, printing "<name> <sha256>" for each (pin the
# sha256 in the manifest's `plugins:` section).
#
#   ./build.sh                # all connectors
#   JOBS=2 ./build.sh         # more parallel jobs (default 1)
#   ./build.sh --test-guests  # also the host's test guests (test-hostile,
#                             # test-hostile-source), left in target/ and
#                             # not copied to dist/
set -euo pipefail

test_guests=0
for arg in "$@"; do
  case "$arg" in
    --test-guests) test_guests=1 ;;
    *) echo "usage: $0 [--test-guests]" >&2; exit 2 ;;
  esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

target=wasm32-wasip2
connectors=(source-csv source-http dest-webhook dest-file)

if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$target"; then
  echo "installing the $target target" >&2
  rustup target add "$target"
fi

packages=()
for c in "${connectors[@]}"; do packages+=(-p "$c"); done
cargo build --release --locked --target "$target" -j "${JOBS:-1}" "${packages[@]}"

mkdir -p dist
for c in "${connectors[@]}"; do
  name="${c//-/_}"
  src="target/$target/release/$name.wasm"
  # A component starts with the magic \0asm and version 0x0d 0x00, layer 0x01 0x00.
  if [ "$(head -c 8 "$src" | od -An -tx1 | tr -d ' \n')" != "0061736d0d000100" ]; then
    echo "$src is not a WebAssembly component" >&2
    exit 1
  fi
  cp "$src" "dist/$name.wasm"
  sum="$(sha256sum "dist/$name.wasm" | cut -d' ' -f1)"
  echo "$name $sum"
done

if [ "$test_guests" = 1 ]; then
  # A separate build, so the test guests' dependency features can never
  # change the shipped components (and their pinned digests).
  guests=(test-hostile test-hostile-source)
  packages=()
  for g in "${guests[@]}"; do packages+=(-p "$g"); done
  cargo build --release --locked --target "$target" -j "${JOBS:-1}" "${packages[@]}"
  for g in "${guests[@]}"; do
    src="target/$target/release/${g//-/_}.wasm"
    if [ "$(head -c 8 "$src" | od -An -tx1 | tr -d ' \n')" != "0061736d0d000100" ]; then
      echo "$src is not a WebAssembly component" >&2
      exit 1
    fi
    # On stderr: stdout stays "<name> <sha256>" lines of shipped connectors.
    echo "test guest $src $(sha256sum "$src" | cut -d' ' -f1)" >&2
  done
fi
