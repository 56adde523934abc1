#!/usr/bin/env bash
# Builds the safetensors fuzzer with clang++ -fsanitize=fuzzer,address,undefined and runs it
# from the committed seed corpus (fuzz/corpus) for a bounded time.
#
#   fuzz/run_fuzzer.sh <work dir> [seconds, default 60] [include dirs, ':'-separated]
#
# e.g. an hour locally:  fuzz/run_fuzzer.sh /tmp/smear-fuzz 3600
# New interesting inputs go to <work dir>/corpus (the committed corpus is only read; fold them
# into it with fuzz/merge_corpus.sh <work dir>); a crash leaves <work dir>/crash-* to reproduce
# with `<work dir>/safetensors_fuzzer <file>`. Exits 77 (ctest: skipped) when clang++ or
# libFuzzer is missing. See fuzz/README.md.
#
# Environment: SMEAR_FUZZ_CXX (default clang++); SMEAR_FUZZ_MAX_LEN, the longest input in bytes
# (default 1 MiB, room for headers of some 15 000 entries: see fuzz/README.md);
# SMEAR_FUZZ_ARGS, more libFuzzer options.
set -u
here=$(cd "$(dirname "$0")" && pwd)
work=${1:?usage: run_fuzzer.sh <work dir> [seconds] [include dirs]}
seconds=${2:-60}
includes=${3:-/usr/include/eigen3}
cxx=${SMEAR_FUZZ_CXX:-clang++}
max_len=${SMEAR_FUZZ_MAX_LEN:-1048576}

if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "fuzz: $cxx not found (Debian: clang), skipped"
  exit 77
fi
mkdir -p "$work"
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' >"$work/probe.cpp"
if ! "$cxx" -fsanitize=fuzzer "$work/probe.cpp" -o "$work/probe" >"$work/probe.log" 2>&1; then
  echo "fuzz: $cxx cannot link libFuzzer (Debian: libclang-rt-dev), skipped"
  cat "$work/probe.log"
  exit 77
fi

flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -fno-omit-frame-pointer -I"$here/../include")
IFS=':' read -r -a dirs <<<"$includes"
for d in "${dirs[@]}"; do
  case "$d" in ""|/usr/include|/usr/local/include) ;;  # already searched; -isystem would break include_next
    *) flags+=(-isystem "$d") ;; esac
done

echo "fuzz: building $work/safetensors_fuzzer"
"$cxx" "${flags[@]}" "$here/safetensors_fuzzer.cpp" -o "$work/safetensors_fuzzer" || exit 1

rm -rf "$work/corpus" && mkdir -p "$work/corpus"
echo "fuzz: running for ${seconds}s from $(ls "$here/corpus" | wc -l) seed files, -max_len=$max_len"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
# shellcheck disable=SC2086  # SMEAR_FUZZ_ARGS is a list of options
exec "$work/safetensors_fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
  -max_len="$max_len" -dict="$here/safetensors.dict" -print_final_stats=1 -artifact_prefix="$work/" \
  ${SMEAR_FUZZ_ARGS:-} "$work/corpus" "$here/corpus"
