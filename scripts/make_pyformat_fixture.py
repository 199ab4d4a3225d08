#!/usr/bin/env python3
"""Writes stages/tests/fixtures/pyformat.tsv: how CPython formats floats.

Optional; the file is committed. Each line: the float's bits (16 hex digits), then
repr(x), f"{x:.3e}", f"{x:.6e}", f"{x:.4f}" (`-` when |x| >= 1e20) and json.dumps(x), tab-separated.
The Rust tests in stages/src/io/pyjson.rs check qpipe's formatting against every line.
"""
import json
import random
import struct
from pathlib import Path

random.seed(20261124)
values = [0.0, -0.0, 1.0, 8.0, 0.1, 1e-5, 1e-4, 1e15, 1e16, 1e17, 5e-324, 1.7976931348623157e308,
          2.5, 0.125, 1.0625, 8.3385, 2.0005, 1234.5, 9.9995, 9.99995e-5, 0.00015, 123456789.0]
# Exact binary ties at 3 and 6 significant decimals, and near-ties.
for m in range(1, 400):
    values.append(m / 8.0)
    values.append(m / 1024.0)
for _ in range(800):
    e = random.randint(-40, 40)
    values.append(random.choice([1, -1]) * random.random() * 10.0 ** e)
for _ in range(200):
    bits = random.getrandbits(64)
    x = struct.unpack("<d", struct.pack("<Q", bits))[0]
    if x == x and abs(x) != float("inf"):
        values.append(x)

out = Path(__file__).resolve().parent.parent / "stages/tests/fixtures/pyformat.tsv"
with out.open("w") as f:
    for x in values:
        bits = struct.unpack("<Q", struct.pack("<d", x))[0]
        fixed = f"{x:.4f}" if abs(x) < 1e20 else "-"
        f.write(f"{bits:016x}\t{x!r}\t{x:.3e}\t{x:.6e}\t{fixed}\t{json.dumps(x)}\n")
print(f"wrote {len(values)} lines to {out}")
