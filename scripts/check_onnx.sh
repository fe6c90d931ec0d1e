#!/usr/bin/env bash
# Checks `mnistconv export` with onnxruntime: trains two small models (with and without biases,
# mean and max pooling), exports them, and compares onnxruntime's logits with the crate's
# (`mnistconv predict --json`, f64 reference path) on 50 images; fails above 1e-5 absolute.
# Installs onnxruntime from PyPI into a throw-away virtual environment; skips (exit 0, with a
# message) only where Python is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v python3 >/dev/null; then
    echo "check_onnx: SKIPPED — python3 is not installed"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q onnxruntime numpy
cargo build --release --quiet
bin=target/release/mnistconv
for flags in "" "--bias --pooling max"; do
    # shellcheck disable=SC2086
    $bin train --epochs 1 --limit 1000 --quiet $flags --out "$work/m.safetensors" >/dev/null
    $bin export --model "$work/m.safetensors" --onnx "$work/m.onnx" >/dev/null
    $bin predict --model "$work/m.safetensors" --index $(seq 0 49) --json > "$work/expect.jsonl"
    "$work/venv/bin/python" - "$work/m.onnx" "$work/expect.jsonl" <<'PY'
import gzip, json, struct, sys
import numpy as np
import onnxruntime as ort

model, expect = sys.argv[1], sys.argv[2]
raw = gzip.open("fixtures/mnist-sample/t10k-images-idx3-ubyte.gz").read()
n, r, c = struct.unpack(">III", raw[4:16])
imgs = np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, r, c)
want = [json.loads(l) for l in open(expect)]
x = np.stack([imgs[w["index"]] for w in want]).astype(np.float32) / np.float32(255.0)
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
logits, probs = sess.run(["logits", "probabilities"], {"input": x})
diff = float(np.max(np.abs(logits.astype(np.float64) - np.array([w["logits"] for w in want]))))
pdiff = float(np.max(np.abs(probs.astype(np.float64) - np.array([w["probabilities"] for w in want]))))
print(f"check_onnx: {len(want)} images, max |logit diff| {diff:.2e}, max |prob diff| {pdiff:.2e}")
sys.exit(0 if diff <= 1e-5 else 1)
PY
done
echo "check_onnx: passed"
