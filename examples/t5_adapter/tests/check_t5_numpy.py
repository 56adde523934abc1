"""Recomputes the T5 encoder's forward pass with numpy, straight from the equations of
Hugging Face's modeling_t5 (T5LayerNorm, T5Attention._relative_position_bucket, T5DenseActDense
/ T5DenseGatedActDense), reading the safetensors file with its own parser, and compares with
the C++ output written by t5_fixture.

Usage: check_t5_numpy.py DIR
"""
import json
import math
import struct
import sys

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        assert v["dtype"] == "F32"
        a, b = v["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<f4").reshape(v["shape"]).astype(np.float64)
    return out


def bucket(rel, num_buckets, max_distance):
    num_buckets //= 2
    ret = num_buckets if rel > 0 else 0
    n = abs(rel)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(large, num_buckets - 1)


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def encode(w, c, ids):
    n = len(ids)
    H, dk = c["num_heads"], c["d_kv"]
    x = w["shared.weight"][ids]
    rel = w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    pos = np.array([[rel[bucket(j - i, c["num_buckets"], c["max_distance"])] for j in range(n)] for i in range(n)])
    pos = pos.transpose(2, 0, 1)  # [H, n, n]
    for l in range(c["num_layers"]):
        p = f"encoder.block.{l}.layer."
        h = rms(x, w[p + "0.layer_norm.weight"], c["eps"])
        q = (h @ w[p + "0.SelfAttention.q.weight"].T).reshape(n, H, dk).transpose(1, 0, 2)
        k = (h @ w[p + "0.SelfAttention.k.weight"].T).reshape(n, H, dk).transpose(1, 0, 2)
        v = (h @ w[p + "0.SelfAttention.v.weight"].T).reshape(n, H, dk).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) + pos
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        a = s / s.sum(axis=-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(n, H * dk)
        x = x + ctx @ w[p + "0.SelfAttention.o.weight"].T
        h = rms(x, w[p + "1.layer_norm.weight"], c["eps"])
        if c["gated_gelu"]:
            f = gelu_new(h @ w[p + "1.DenseReluDense.wi_0.weight"].T) * (h @ w[p + "1.DenseReluDense.wi_1.weight"].T)
        else:
            f = np.maximum(h @ w[p + "1.DenseReluDense.wi.weight"].T, 0.0)
        x = x + f @ w[p + "1.DenseReluDense.wo.weight"].T
    return rms(x, w["encoder.final_layer_norm.weight"], c["eps"])


def main():
    d = sys.argv[1]
    worst = 0.0
    for name in ["relu", "gated"]:
        w = read_safetensors(f"{d}/{name}.safetensors")
        j = json.load(open(f"{d}/{name}.json"))
        c, B, L = j["config"], j["B"], j["L"]
        ids = np.array(j["ids"]).reshape(B, L)
        got = np.array(j["output"]).reshape(B, L, c["d_model"])
        for b in range(B):
            n = j["lengths"][b]
            want = encode(w, c, ids[b, :n])
            err = np.max(np.abs(got[b, :n] - want)) / max(1.0, np.max(np.abs(want)))
            pad = np.max(np.abs(got[b, n:])) if n < L else 0.0
            print(f"{name} example {b} (length {n}): max relative error {err:.2e}, padding max {pad:.1e}")
            worst = max(worst, err, pad)
    if not worst < 1e-5:
        print(f"FAIL: worst error {worst:.2e} >= 1e-5")
        sys.exit(1)
    print(f"OK: worst error {worst:.2e}")


if __name__ == "__main__":
    main()
