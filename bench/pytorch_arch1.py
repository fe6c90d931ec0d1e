#!/usr/bin/env python3
"""Architecture 1 in PyTorch, timed the way `mnistconv bench` times it, for a same-sitting comparison.

    Sequential(conv=Conv2d(1, 20, 9, bias=False), ReLU, AvgPool2d(2), Flatten(),
               fc1=Linear(2000, 100, bias=False), ReLU, fc2=Linear(100, 10, bias=False))

Training: SGD with momentum 0.9, lr 0.05, weight decay 5e-4, batch 100 (the default recipe's
optimiser), cross-entropy, shuffled epochs over `--images` images (u8 kept in memory, scaled per
batch, as mnistconv does). Inference: batches of 1000 under torch.inference_mode, and one image at
a time. Reports medians over --runs and the peak RSS, as one JSON line with --json.

    python bench/pytorch_arch1.py --threads 2 [--data ../shared/data/mnist] [--runs 5]

With --check-checkpoint FILE --expect-json FILE it instead loads a mnistconv checkpoint with
load_state_dict and compares its logits with those mnistconv printed:

    mnistconv predict --model m.safetensors --index 0 1 2 ... --json > expect.jsonl
    python bench/pytorch_arch1.py --check-checkpoint m.safetensors --expect-json expect.jsonl
"""
import argparse, gzip, json, os, resource, statistics, struct, sys, time

import numpy as np
import torch
from torch import nn


def model(bias=False):
    return nn.Sequential(
        __import__("collections").OrderedDict(
            conv=nn.Conv2d(1, 20, 9, bias=bias),
            relu1=nn.ReLU(),
            pool=nn.AvgPool2d(2),
            flat=nn.Flatten(),
            fc1=nn.Linear(2000, 100, bias=bias),
            relu2=nn.ReLU(),
            fc2=nn.Linear(100, 10, bias=bias),
        )
    )


def read_idx(path):
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    magic = struct.unpack(">I", raw[:4])[0]
    if magic == 2051:
        n, r, c = struct.unpack(">III", raw[4:16])
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, r, c)
    n = struct.unpack(">I", raw[4:8])[0]
    return np.frombuffer(raw, np.uint8, offset=8)


def find(d, stem):
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    sys.exit(f"{d}: no {stem}[.gz]")


def load(d, n):
    if d is None:
        d = os.path.join(os.path.dirname(__file__), "..", "fixtures", "mnist-sample")
    x = read_idx(find(d, "train-images-idx3-ubyte"))
    y = read_idx(find(d, "train-labels-idx1-ubyte"))
    reps = -(-n // len(x))
    return np.concatenate([x] * reps)[:n].copy(), np.concatenate([y] * reps)[:n].astype(np.int64)


def check_checkpoint(path, expect, data):
    """Loads a mnistconv checkpoint into the PyTorch module and compares its logits with the
    JSON lines of `mnistconv predict --json` (images from the t10k files of `data`)."""
    from safetensors.torch import load_file

    sd = load_file(path)
    m = model(bias="conv.bias" in sd)
    m.load_state_dict(sd)  # strict: names, shapes must match exactly
    if data is None:
        data = os.path.join(os.path.dirname(__file__), "..", "fixtures", "mnist-sample")
    imgs = read_idx(find(data, "t10k-images-idx3-ubyte"))
    worst, n = 0.0, 0
    with torch.inference_mode():
        for line in open(expect):
            item = json.loads(line)
            x = torch.from_numpy(imgs[item["index"]].astype(np.float32) / 255.0).reshape(1, 1, 28, 28)
            logits = m(x)[0].double().numpy()
            worst = max(worst, float(np.max(np.abs(logits - np.array(item["logits"])))))
            n += 1
    print(json.dumps({"images": n, "max_abs_logit_diff": worst}))
    return 0 if worst <= 1e-4 else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--data")
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check-checkpoint")
    ap.add_argument("--expect-json")
    a = ap.parse_args()
    if a.check_checkpoint:
        sys.exit(check_checkpoint(a.check_checkpoint, a.expect_json, a.data))

    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    xs, ys = load(a.data, a.images)
    X, Y = torch.from_numpy(xs), torch.from_numpy(ys)
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    lossf = nn.CrossEntropyLoss()
    n = len(X)

    epochs = []
    for _ in range(a.runs):
        perm = torch.randperm(n)
        t0 = time.perf_counter()
        for i in range(0, n, a.batch):
            idx = perm[i : i + a.batch]
            xb = X[idx].unsqueeze(1).float().div_(255.0)
            opt.zero_grad(set_to_none=True)
            loss = lossf(m(xb), Y[idx])
            loss.backward()
            opt.step()
        epochs.append(time.perf_counter() - t0)
    epoch = statistics.median(epochs)

    ips = []
    with torch.inference_mode():
        for _ in range(a.runs):
            t0 = time.perf_counter()
            for i in range(0, n, 1000):
                m(X[i : i + 1000].unsqueeze(1).float().div_(255.0))
            ips.append(n / (time.perf_counter() - t0))
        lat = []
        for i in range(min(2000, n)):
            t0 = time.perf_counter()
            m(X[i : i + 1].unsqueeze(1).float().div_(255.0))
            lat.append((time.perf_counter() - t0) * 1e6)
    r = {
        "framework": f"pytorch {torch.__version__}",
        "threads": a.threads,
        "images": n,
        "batch": a.batch,
        "runs": a.runs,
        "train_epoch_seconds": epoch,
        "train_epoch_seconds_runs": epochs,
        "train_images_per_second": n / epoch,
        "infer_images_per_second": statistics.median(ips),
        "latency_us": statistics.median(lat),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if a.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
