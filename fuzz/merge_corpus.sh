#!/usr/bin/env bash
# Folds what a fuzzing run found into the committed corpus, minimised: libFuzzer's -merge=1
# into a fresh directory that starts with the hand-written seeds of make_corpus.py (kept under
# their names), then takes from fuzz/corpus and <work dir>/corpus only the inputs that add
# coverage. fuzz/corpus is then replaced by the result.
#
# -use_counters=0: an input is kept when it reaches a code edge none before it reached, not a new
# hit count of one (with counters, the corpus of the first long run kept 667 files, 3.1 MB; edges
# only, 136 files, 0.6 MB). Fuzzing itself runs with counters; they are rebuilt from this corpus
# within seconds.
#
#   fuzz/merge_corpus.sh <work dir of run_fuzzer.sh>
#
# Needs <work dir>/safetensors_fuzzer (built by run_fuzzer.sh). SMEAR_FUZZ_MAX_LEN as there.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=${1:?usage: merge_corpus.sh <work dir>}
max_len=${SMEAR_FUZZ_MAX_LEN:-1048576}
fuzzer="$work/safetensors_fuzzer"
[ -x "$fuzzer" ] || { echo "merge: $fuzzer missing: run fuzz/run_fuzzer.sh $work first"; exit 1; }
mkdir -p "$work/corpus"
fresh="$work/merged"
rm -rf "$fresh" && mkdir -p "$fresh"
python3 "$here/make_corpus.py" "$fresh"
before=$(ls "$here/corpus" | wc -l)
found=$(ls "$work/corpus" | wc -l)
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} "$fuzzer" -merge=1 -use_counters=0 -max_len="$max_len" -timeout=10 \
  -rss_limit_mb=2048 "$fresh" "$here/corpus" "$work/corpus" >"$work/merge.log" 2>&1 \
  || { tail -20 "$work/merge.log"; exit 1; }
rm -f "$here/corpus"/*
cp "$fresh"/* "$here/corpus"/
after=$(ls "$here/corpus" | wc -l)
echo "merge: $before committed + $found found -> $after files ($(du -sh "$here/corpus" | cut -f1)) in fuzz/corpus"
