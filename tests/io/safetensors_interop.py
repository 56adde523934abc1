#!/usr/bin/env python3
"""An independent reader and writer of the safetensors format (json + struct only), to
cross-check smear's: `write FILE` writes the reference tensors the way the `safetensors`
package does (8-byte little-endian length, JSON header padded with spaces to 8 bytes,
tensors sorted by name, "__metadata__": {"format": "pt"}); `check FILE` reads a file written
by smear and checks every byte-level rule of the format and every value.

Reference tensors: "f32" F32 [2, 3], "f64" F64 [3], "f16" F16 [4], "bf16" BF16 [2, 2],
element i = (i - 2) * 0.375."""
import json
import struct
import sys

TENSORS = {"f32": ("F32", [2, 3]), "f64": ("F64", [3]), "f16": ("F16", [4]), "bf16": ("BF16", [2, 2])}
SIZES = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2}


def values(n):
    return [(i - 2) * 0.375 for i in range(n)]


def count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def encode(dtype, vals):
    if dtype == "F32":
        return struct.pack("<%df" % len(vals), *vals)
    if dtype == "F64":
        return struct.pack("<%dd" % len(vals), *vals)
    if dtype == "F16":
        return struct.pack("<%de" % len(vals), *vals)
    # BF16: the upper half of the float32 (the values are exact, so no rounding is needed)
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in vals)


def decode(dtype, raw):
    n = len(raw) // SIZES[dtype]
    if dtype == "F32":
        return list(struct.unpack("<%df" % n, raw))
    if dtype == "F64":
        return list(struct.unpack("<%dd" % n, raw))
    if dtype == "F16":
        return list(struct.unpack("<%de" % n, raw))
    return [struct.unpack("<f", b"\0\0" + raw[2 * i:2 * i + 2])[0] for i in range(n)]


def write(path):
    header = {"__metadata__": {"format": "pt"}}
    data = b""
    for name in sorted(TENSORS):
        dtype, shape = TENSORS[name]
        blob = encode(dtype, values(count(shape)))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    print("wrote", path)


def check(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    assert 8 + n <= len(blob), "header length past the end"
    assert blob[8:9] == b"{", "header does not start with {"
    assert (8 + n) % 8 == 0, "data not aligned to 8 bytes"
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    assert header.get("__metadata__", {}).get("format") == "pt", "no format = pt in __metadata__"
    ranges = []
    for name, (dtype, shape) in TENSORS.items():
        info = header[name]
        assert set(info) == {"dtype", "shape", "data_offsets"}, name
        assert info["dtype"] == dtype and info["shape"] == shape, name
        begin, end = info["data_offsets"]
        assert end - begin == count(shape) * SIZES[dtype], name
        got = decode(dtype, data[begin:end])
        assert got == values(count(shape)), "%s: %r" % (name, got)
        ranges.append((begin, end))
    assert len(header) == len(TENSORS) + 1, "unexpected entries"
    ranges.sort()
    at = 0
    for begin, end in ranges:
        assert begin == at, "gap or overlap in the data"
        at = end
    assert at == len(data), "data not fully covered"
    print(path + ": all tensors as expected")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        sys.exit("usage: safetensors_interop.py write|check FILE")
    (write if sys.argv[1] == "write" else check)(sys.argv[2])
