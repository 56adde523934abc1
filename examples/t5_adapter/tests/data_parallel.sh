#!/bin/sh
# Data-parallel training end to end: `smear-t5 train` as one process and under
# `mpirun -np 2` on the tiny data set must write the same checkpoint (float32: to 1e-4 of the
# largest value), for a strategy that samples (REINFORCE, whose moving-average baseline is a
# batch statistic) and for SMEAR with expert dropout.
#   data_parallel.sh SMEAR_T5 MPIEXEC PYTHON TINY_DIR OUT_DIR [MPIEXEC_FLAGS...]
set -eu
t5=$1 mpiexec=$2 python=$3 data=$4 out=$5
shift 5
common="--data $data --backbone $data/backbone.safetensors --steps 24 --eval-every 12 --batch 16
        --d-model 16 --layers 1 --heads 2 --d-kv 8 --d-ff 32 --bottleneck 4"
for method in reinforce smear; do
  # shellcheck disable=SC2086
  "$t5" train --method $method --out "$out/one" $common
  # shellcheck disable=SC2086
  "$mpiexec" -np 2 "$@" "$t5" train --method $method --out "$out/two" $common
  "$python" - "$out/one/$method.safetensors" "$out/two/$method.safetensors" <<'PY'
import json, struct, sys
import numpy as np

def read(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: np.frombuffer(raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], dtype=np.float32)
            for k, v in header.items()}

one, two = read(sys.argv[1]), read(sys.argv[2])
assert one.keys() == two.keys(), (sorted(one), sorted(two))
worst = max(float(np.max(np.abs(one[k] - two[k]))) / (float(np.max(np.abs(one[k]))) + 1e-30) for k in one)
moved = sum(int(np.any(one[k] != 0)) for k in one)
print(f"{sys.argv[1]}: {len(one)} tensors, {moved} nonzero, worst relative difference 1 vs 2 processes {worst:.2e}")
sys.exit(0 if worst <= 1e-4 and moved > 0 else 1)
PY
done
