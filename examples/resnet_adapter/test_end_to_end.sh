#!/usr/bin/env bash
# A tiny end-to-end run of smear-resnet on a generated data set (no download): pre-train, save
# and reload the backbone, train and compare two strategies, write the tables and a heatmap.
# Fails when a step fails, an output is missing, or SMEAR does not learn above chance.
set -euo pipefail
bin="$1"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT

"$bin" make-tiny "$dir/data"
"$bin" quick --data "$dir/data" --pretrain-data "$dir/data/pretrain.bin" --width 4 --blocks 1,1 \
  --pretrain-epochs 3 --epochs 30 --lr 1e-2 --strategies smear,single,tag,reinforce --out "$dir/out" --quiet

for f in backbone.safetensors compare.csv compare.md heatmap-smear-adapter-N6-seed0.svg; do
  [[ -s "$dir/out/$f" ]] || { echo "missing output $f" >&2; exit 1; }
done
grep -q '^| smear | adapter | 6 | 1 |' "$dir/out/compare.md" || { echo "no smear row in compare.md" >&2; exit 1; }
for s in single tag reinforce; do
  grep -q "^| $s | adapter | [16] | 1 |" "$dir/out/compare.md" || { echo "no $s row in compare.md" >&2; exit 1; }
done
# 4 balanced classes: chance is 0.25 (this run reaches about 0.67)
awk -F, '$1 == "smear" { found = 1; if ($8 <= 0.4) { print "smear average accuracy " $8 " is not above chance" > "/dev/stderr"; exit 1 } }
         END { if (!found) { print "no smear line in compare.csv" > "/dev/stderr"; exit 1 } }' "$dir/out/compare.csv"

# the saved backbone is reused by train; a conv-adapter bank with 12 experts runs too
"$bin" train --data "$dir/data" --backbone "$dir/out/backbone.safetensors" --strategy smear --expert conv \
  --experts 12 --epochs 1 --out "$dir/train" --quiet | grep -q '^| smear | conv3x3 | 12 | 1 |'

# Soft MoE runs with the per-position adapter; the convolutional adapter is refused, saying why
"$bin" train --data "$dir/data" --backbone "$dir/out/backbone.safetensors" --strategy soft_moe --epochs 1 \
  --out "$dir/soft" --quiet | grep -q '^| soft_moe | adapter | 6 | 1 |'
if "$bin" train --data "$dir/data" --backbone "$dir/out/backbone.safetensors" --strategy soft_moe --expert conv \
  --epochs 1 --out "$dir/soft_conv" 2> "$dir/err"; then exit 1; fi
grep -q "soft_moe runs each expert on slots" "$dir/err"

# errors: a clear message and a non-zero status
if "$bin" train --data "$dir/nowhere" --backbone "$dir/out/backbone.safetensors" 2> "$dir/err"; then exit 1; fi
grep -q "emoji.bin not found" "$dir/err"
if "$bin" compare --data "$dir/data" --backbone "$dir/out/backbone.safetensors" --strategies nonsense 2> "$dir/err"; then exit 1; fi
grep -q "unknown strategy 'nonsense'" "$dir/err"
if "$bin" train --data "$dir/data" --backbone "$dir/out/backbone.safetensors" --experts 7 2> "$dir/err"; then exit 1; fi
grep -q "experts must be 6 or 12" "$dir/err"
echo "end-to-end: ok"
