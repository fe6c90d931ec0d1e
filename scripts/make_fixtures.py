#!/usr/bin/env python3
"""Carve the committed MNIST fixture sample from the shared MNIST training set.

Usage: python3 scripts/make_fixtures.py ../shared/data/mnist fixtures/mnist-sample

train-*: images 0..5000 of the MNIST training set.
t10k-*:  images 59000..60000 of the MNIST training set (NOT the official test set;
         named t10k so the tool treats it as this sample's held-out split).
The output is deterministic (gzip mtime 0), so re-running reproduces the committed bytes.
"""
import gzip, struct, sys, os

src, dst = sys.argv[1], sys.argv[2]
imgs = gzip.open(os.path.join(src, "train-images-idx3-ubyte.gz")).read()
labs = gzip.open(os.path.join(src, "train-labels-idx1-ubyte.gz")).read()
magic, n, rows, cols = struct.unpack(">IIII", imgs[:16])
assert magic == 2051 and n == 60000
assert struct.unpack(">II", labs[:8]) == (2049, 60000)
px = rows * cols

def write(name, data):
    with open(os.path.join(dst, name), "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
            g.write(data)

for prefix, lo, hi in (("train", 0, 5000), ("t10k", 59000, 60000)):
    m = hi - lo
    write(f"{prefix}-images-idx3-ubyte.gz",
          struct.pack(">IIII", 2051, m, rows, cols) + imgs[16 + lo * px:16 + hi * px])
    write(f"{prefix}-labels-idx1-ubyte.gz",
          struct.pack(">II", 2049, m) + labs[8 + lo:8 + hi])
