#!/usr/bin/env python3
"""Writes the fuzzer's seed corpus (fuzz/corpus): small valid safetensors files, some in the
checkpoint scheme the fuzzer loads (a bank of 2 linear<float>{2, 3} experts and a router over
2-dimensional inputs), and broken ones. Run from anywhere: python3 fuzz/make_corpus.py [dir]
(default fuzz/corpus; fuzz/merge_corpus.sh writes them into a fresh directory)."""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")
SIZES = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I32": 4, "U8": 1, "BOOL": 1}


def count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def encode(dtype, vals):
    fmt = {"F32": "f", "F64": "d", "F16": "e", "I32": "i", "U8": "B", "BOOL": "?"}
    if dtype == "BF16":
        return b"".join(struct.pack("<f", v)[2:] for v in vals)
    return struct.pack("<%d%s" % (len(vals), fmt[dtype]), *vals)


def safetensors(tensors, metadata=None, pad=True):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        vals = [((i * 7) % 5 - 2) * 0.5 for i in range(count(shape))]
        if dtype in ("I32", "U8", "BOOL"):
            vals = [int(abs(v)) for v in vals]
        blob = encode(dtype, vals)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def raw(header_text, data=b""):
    text = header_text.encode()
    return struct.pack("<Q", len(text)) + text + data


CHECKPOINT = [("experts.weight", "F32", [2, 2, 3]), ("experts.bias", "F32", [2, 3]),
              ("router.layer_norm.weight", "F32", [2]), ("router.layer_norm.bias", "F32", [2]),
              ("router.weight", "F32", [2, 2]), ("router.bias", "F32", [2])]

FILES = {
    "valid_checkpoint_f32": safetensors(CHECKPOINT, {"format": "pt"}),
    "valid_checkpoint_bf16": safetensors([(n, "BF16", s) for n, _, s in CHECKPOINT]),
    "valid_checkpoint_f16": safetensors([(n, "F16", s) for n, _, s in CHECKPOINT], {"format": "pt"}),
    "valid_checkpoint_f64": safetensors([(n, "F64", s) for n, _, s in CHECKPOINT], pad=False),
    "valid_mixed": safetensors([("a", "F32", [3]), ("b", "I32", [2]), ("c", "U8", [3]), ("d", "BOOL", [1]),
                                ("e", "F16", []), ("f", "F64", [0, 2])]),
    "valid_empty": raw("{}"),
    "valid_metadata_only": raw('{"__metadata__":{"format":"pt","k":"v"}}'),
    "wrong_shape_checkpoint": safetensors([(n, "F32", s[::-1]) for n, _, s in CHECKPOINT]),
    "broken_truncated": safetensors(CHECKPOINT)[:-5],
    "broken_header_past_end": struct.pack("<Q", 1000) + b'{"a":1}',
    "broken_short": b"\x08\x00\x00",
    "broken_overlap": raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                          '"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)),
    "broken_overflow": raw('{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'),
    "broken_dtype": raw('{"a":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "broken_duplicate": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                            '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)),
    "broken_json": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]', bytes(4)),
    "broken_nesting": raw('{"a":' + "[" * 64 + "]" * 64 + "}"),
    "broken_field_twice": raw('{"a":{"dtype":"F64","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "broken_metadata_twice": raw('{"__metadata__":{"k":"a","k":"b"}}'),
    "broken_nul_junk": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}\0junk', bytes(4)),
    "broken_numbers": raw('{"a":{"dtype":"U8","shape":[01,1.5,1e3,-0],"data_offsets":[0,18446744073709551616]}}'),
    "broken_surrogate": raw('{"\\ud83d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'),
    "valid_escapes": raw('{"a\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00\\u0000":'
                         '{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                         '"__metadata__":{"\u00e9\u20ac":"\\u0041"}}', bytes(4)),
    "valid_whitespace": raw('{ "__metadata__" :\t{ "format" : "pt" } ,\n "a" : { "shape" : [ 2 ] ,\r'
                            ' "data_offsets" : [ 0 , 4 ] , "dtype" : "BF16" } }\n\t  ', bytes(4)),
    "valid_many_entries": safetensors([("layer.%d.w" % i, ("F32", "F16", "BF16", "U8")[i % 4], [i % 3])
                                       for i in range(300)], {"format": "pt"}),
}

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else OUT
    os.makedirs(out, exist_ok=True)
    for name, blob in FILES.items():
        with open(os.path.join(out, name + ".safetensors"), "wb") as f:
            f.write(blob)
    print("wrote %d files to %s" % (len(FILES), out))
