#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each), coverage-guided (libFuzzer via
# cargo-fuzz, nightly toolchain), starting from the committed seeds in fuzz/corpus/<target>.
# New inputs go to a scratch corpus; crashes land in fuzz/artifacts/<target>.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Needs: rustup toolchain nightly, `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx_parse checkpoint_load preprocess)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    # -rss_limit_mb / -malloc_limit_mb: an input that makes the parser allocate beyond this fails.
    cargo +nightly fuzz run "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=1024 -malloc_limit_mb=512 -timeout=10 2>&1 | tail -n 3
done
