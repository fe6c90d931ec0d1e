#!/usr/bin/env bash
# One sitting: mnistconv, PyTorch and (optionally) another build of mnistconv, interleaved, each
# printing one JSON line of medians, then one thread each. Usage:
#   bench/sitting.sh DATA_DIR PYTHON [OTHER_MNISTCONV]
# e.g. bench/sitting.sh ../shared/data/mnist /work/venv-torch/bin/python /tmp/base-target/release/mnistconv
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?data directory}
py=${2:?python with torch}
other=${3:-}
mc=./target/release/mnistconv
run() {
    local name=$1
    shift
    echo "== $name $(date +%T)"
    "$@" --data "$data" --json 2>/dev/null | tail -1
}
cargo build --release --quiet
run mnistconv "$mc" bench
run pytorch "$py" bench/pytorch_arch1.py --threads 2
run mnistconv "$mc" bench
[ -n "$other" ] && run other "$other" bench
run mnistconv "$mc" bench
run pytorch "$py" bench/pytorch_arch1.py --threads 2
[ -n "$other" ] && run other "$other" bench
run mnistconv-1-thread "$mc" bench --threads 1
run pytorch-1-thread "$py" bench/pytorch_arch1.py --threads 1
[ -n "$other" ] && run other-1-thread "$other" bench --threads 1
true
