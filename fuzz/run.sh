#!/usr/bin/env bash
# Fuzzes every target (or those named as arguments) for FUZZ_SECONDS each (default 60). Each run
# first replays the committed seeds (corpus/<target>/) and kept crash inputs (regressions/
# <target>/). Fails if any target crashes; the input is left in fuzz/artifacts/<target>/.
# (`cargo test` in fuzz/ replays the same files on stable without instrumentation.)
#
# Toolchain: stable, with cargo-fuzz in its `--sanitizer none` mode (libFuzzer with LLVM's
# coverage instrumentation, which stable rustc accepts; only the sanitizers need nightly). The
# library is `#![forbid(unsafe_code)]`, so AddressSanitizer would look only at dependencies'
# unsafe code. To fuzz with it anyway: FUZZ_TOOLCHAIN=nightly FUZZ_SANITIZER=address.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-60}"
toolchain="${FUZZ_TOOLCHAIN:-stable}"
sanitizer="${FUZZ_SANITIZER:-none}"
cargo_fuzz_version="0.13.2"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export CARGO_TARGET_DIR="$target_dir"

if ! cargo fuzz --version 2>/dev/null | grep -qF "$cargo_fuzz_version"; then
  echo "installing cargo-fuzz $cargo_fuzz_version"
  cargo install --quiet --locked cargo-fuzz --version "$cargo_fuzz_version"
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

cargo "+$toolchain" fuzz build --sanitizer "$sanitizer" --target-dir "$target_dir"

failed=()
for target in "${targets[@]}"; do
  # New inputs go to a scratch folder; the committed seeds are only read.
  scratch="$target_dir/corpus/$target"
  mkdir -p "$scratch" "artifacts/$target"
  inputs=("corpus/$target")
  [ -d "regressions/$target" ] && inputs+=("regressions/$target")
  echo "fuzzing $target for ${seconds}s"
  if ! cargo "+$toolchain" fuzz run --sanitizer "$sanitizer" --target-dir "$target_dir" \
    "$target" "$scratch" "${inputs[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    2> >(grep -A1 -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|==|SUMMARY|thread|panicked|Test unit written)" >&2); then
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzzing found crashes in: ${failed[*]}" >&2
  echo "replay one with: cargo fuzz run --sanitizer $sanitizer <target> fuzz/artifacts/<target>/<file>" >&2
  echo "then keep the input in fuzz/regressions/<target>/ with the fix" >&2
  exit 1
fi
echo "fuzzing: ${#targets[@]} targets, ${seconds}s each, no crash"
