#!/usr/bin/env python3
"""PEFT LoRA adapter directories written and checked independently of smear (json + struct
only), following PEFT's documented format: `adapter_config.json` and
`adapter_model.safetensors` holding `base_model.model.<module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r]; the update is s·(x·Aᵀ)·Bᵀ with s = lora_alpha / r (lora_alpha / √r
with use_rslora), added to the base module's x·Wᵀ + b (torch.nn.Linear's [out, in] weight).

  write DIR   DIR/base/model.safetensors (the base model's q and v modules), DIR/adapter_<e>
              for e < 4 (LoRAs of q and v; adapter 2 gets its rank from rank_pattern and
              adapter 3 uses rsLoRA, all with the same scale), DIR/expected.safetensors (x
              [4, L, in] and y [4, L, out]: example e through the base q module and adapter
              e's LoRA of q, computed here), and broken adapters DIR/bad_<what> (bad_nan: a NaN
              in lora_B, refused only by a layer in checked mode).
  check DIR   reads DIR/saved_<e>, written by smear's save_peft from the loaded adapters, and
              checks PEFT's format and that it holds adapter e's LoRA of q.
"""
import json
import math
import os
import struct
import sys

MODULE = "encoder.block.0.layer.0.SelfAttention.q"
OTHER = "encoder.block.0.layer.0.SelfAttention.v"
IN, OUT, R, L, ADAPTERS = 6, 5, 4, 3, 4
ALPHA = 8.0  # s = 2


def value(seed, i):
    """A fixed pseudo-random value in [-1, 1)."""
    return math.sin(1000.0 * seed + 12.9898 * (i + 1)) * 0.97


def matrix(seed, rows, cols):
    return [[value(seed, r * cols + c) for c in range(cols)] for r in range(rows)]


def flat(m):
    return [v for row in m for v in row]


def write_safetensors(path, tensors):
    """tensors: {name: (shape, flat values)}, stored as F64 except names ending in '.weight'
    of the adapters, stored as F32 as PEFT does (values chosen exactly representable)."""
    header, blobs, at = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        shape, vals, dtype = tensors[name]
        raw = struct.pack("<%d%s" % (len(vals), "f" if dtype == "F32" else "d"), *vals)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        code = {"F32": "f", "F64": "d"}[info["dtype"]]
        raw = data[8 + n + b:8 + n + e]
        out[name] = (info["dtype"], info["shape"], list(struct.unpack("<%d%s" % (len(raw) // struct.calcsize(code), code), raw)))
    return header.get("__metadata__", {}), out


def f32(vals):
    return list(struct.unpack("<%df" % len(vals), struct.pack("<%df" % len(vals), *vals)))


def lora_of(e, module_seed, rank):
    a = [f32(row) for row in matrix(10 * e + module_seed, rank, IN)]   # [r, in]
    b = [f32(row) for row in matrix(10 * e + module_seed + 5, OUT, rank)]  # [out, r]
    return a, b


def config(rank, alpha, **extra):
    c = {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": "t5-small",
         "r": rank, "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": ["q", "v"], "bias": "none",
         "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
         "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "revision": None}
    c.update(extra)
    return c


def write_adapter(d, cfg, tensors):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(os.path.join(d, "adapter_model.safetensors"), tensors)


def lora_tensors(e, rank, modules=(MODULE, OTHER)):
    t = {}
    for k, m in enumerate(modules):
        a, b = lora_of(e, k, rank)
        t["base_model.model.%s.lora_A.weight" % m] = ([rank, IN], flat(a), "F32")
        t["base_model.model.%s.lora_B.weight" % m] = ([OUT, rank], flat(b), "F32")
    return t


def write(root):
    base_w, base_b = matrix(99, OUT, IN), [value(98, o) for o in range(OUT)]  # nn.Linear: [out, in]
    os.makedirs(os.path.join(root, "base"), exist_ok=True)
    write_safetensors(os.path.join(root, "base", "model.safetensors"), {
        MODULE + ".weight": ([OUT, IN], flat(base_w), "F64"), MODULE + ".bias": ([OUT], base_b, "F64"),
        OTHER + ".weight": ([OUT, IN], flat(matrix(97, OUT, IN)), "F64")})
    configs = [config(R, ALPHA), config(R, ALPHA, target_modules=".*SelfAttention\\.(q|v)"),
               config(2, ALPHA, rank_pattern={"q": R}, alpha_pattern={}),
               config(R, ALPHA / math.sqrt(R), use_rslora=True)]  # s = α/√r = 2 as well
    for e, cfg in enumerate(configs):
        write_adapter(os.path.join(root, "adapter_%d" % e), cfg, lora_tensors(e, R))
    # example e through base q and adapter e's LoRA of q: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ
    xs, ys = [], []
    for e, cfg in enumerate(configs):
        a, b = lora_of(e, 0, R)
        s = cfg["lora_alpha"] / (math.sqrt(R) if cfg["use_rslora"] else R)
        for t in range(L):
            x = [value(500 + e, t * IN + i) for i in range(IN)]
            xa = [sum(x[i] * a[k][i] for i in range(IN)) for k in range(R)]
            y = [sum(x[i] * base_w[o][i] for i in range(IN)) + base_b[o] + s * sum(xa[k] * b[o][k] for k in range(R))
                 for o in range(OUT)]
            xs += x
            ys += y
    write_safetensors(os.path.join(root, "expected.safetensors"), {
        "x": ([ADAPTERS, L, IN], xs, "F64"), "y": ([ADAPTERS, L, OUT], ys, "F64")})
    # broken adapters, each refused with its own message
    write_adapter(os.path.join(root, "bad_rank"), config(3, 6.0), lora_tensors(0, 3))
    write_adapter(os.path.join(root, "bad_target"), config(R, ALPHA, target_modules=["k", "o"]), lora_tensors(0, R))
    write_adapter(os.path.join(root, "bad_scale"), config(R, 4.0), lora_tensors(0, R))
    write_adapter(os.path.join(root, "bad_dora"), config(R, ALPHA, use_dora=True), lora_tensors(0, R))
    write_adapter(os.path.join(root, "bad_shape"), config(R, ALPHA), {
        "base_model.model.%s.lora_A.weight" % MODULE: ([R - 1, IN], [0.0] * ((R - 1) * IN), "F32"),
        "base_model.model.%s.lora_B.weight" % MODULE: ([OUT, R], [0.0] * (OUT * R), "F32")})
    write_adapter(os.path.join(root, "bad_module"), config(R, ALPHA), lora_tensors(0, R, modules=(OTHER,)))
    nan = lora_tensors(0, R)
    shape, vals, dtype = nan["base_model.model.%s.lora_B.weight" % MODULE]
    nan["base_model.model.%s.lora_B.weight" % MODULE] = (shape, vals[:5] + [float("nan")] + vals[6:], dtype)
    write_adapter(os.path.join(root, "bad_nan"), config(R, ALPHA), nan)
    os.makedirs(os.path.join(root, "bad_json"), exist_ok=True)
    with open(os.path.join(root, "bad_json", "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "LORA", "r": 4,')


def check(root):
    for e in range(ADAPTERS):
        d = os.path.join(root, "saved_%d" % e)
        with open(os.path.join(d, "adapter_config.json")) as f:
            cfg = json.load(f)
        assert cfg["peft_type"] == "LORA" and cfg["r"] == R and cfg["bias"] == "none", cfg
        assert cfg["lora_alpha"] / R == 2.0 and not cfg["use_rslora"] and not cfg["use_dora"], cfg
        assert "q" in cfg["target_modules"] and not cfg["fan_in_fan_out"], cfg
        meta, tensors = read_safetensors(os.path.join(d, "adapter_model.safetensors"))
        assert meta.get("format") == "pt", meta
        a, b = lora_of(e, 0, R)
        key = "base_model.model.%s.lora_%s.weight"
        assert sorted(tensors) == sorted([key % (MODULE, "A"), key % (MODULE, "B")]), sorted(tensors)
        for which, want, shape in (("A", a, [R, IN]), ("B", b, [OUT, R])):
            dtype, got_shape, vals = tensors[key % (MODULE, which)]
            assert got_shape == shape, (which, got_shape)
            assert vals == flat(want), (e, which)  # F32 values round-trip exactly
    print("peft_files: %d adapters saved by smear follow PEFT's format and hold the loaded LoRAs" % ADAPTERS)


if __name__ == "__main__":
    {"write": write, "check": check}[sys.argv[1]](sys.argv[2])
