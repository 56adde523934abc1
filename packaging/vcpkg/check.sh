#!/usr/bin/env bash
# Offline end-to-end check of smear's vcpkg overlay port (packaging/vcpkg/smear), with a vcpkg
# tool built here from source:
#   1. builds the vcpkg tool (microsoft/vcpkg-tool) with CMake, its fmt and CMakeRC from local
#      tarballs made from git checkouts (CMake still checks upstream's SHA512s), libcurl from Debian;
#   2. lays out a vcpkg root (microsoft/vcpkg: ports, scripts, triplets) with that binary;
#   3. builds patchelf (the version vcpkg's scripts would download for their RPATH fixup) into the
#      downloads folder, where vcpkg looks before downloading it;
#   4. classic mode: vcpkg install smear (io by default) with the overlay ports ../smear and
#      system-ports/ (eigen3, xsimd, nlohmann-json stand-ins forwarding to Debian's packages),
#      then builds and runs consumer/ against that installed tree;
#   5. classic mode, smear[core]: no smear::io, no nlohmann-json;
#   6. manifest mode: consumer/vcpkg.json through the vcpkg toolchain, then builds and runs it;
#   7. classic mode with vcpkg's own eigen3 and xsimd ports (their source tarballs made from git
#      checkouts into the downloads folder; vcpkg checks the SHA512s), nlohmann-json a stand-in;
#      the consumer must find all of them in the vcpkg tree with /usr hidden from find_package.
#      Skipped without EIGEN_SRC and XSIMD_SRC; a failure here is counted, not fatal.
# Nothing is downloaded: vcpkg runs with X_VCPKG_ASSET_SOURCES=x-block-origin, and the network
# is cut off altogether (unshare -n) where that is allowed.
#
# Usage: check.sh [VCPKG_TOOL_SRC [VCPKG_SRC [FMT_SRC [CMRC_SRC [PATCHELF_SRC]]]]]
# Each source is a git directory (bare or not: a ref of it is exported) or an extracted tree.
# Environment (defaults in brackets):
#   VCPKG_TOOL_SRC  microsoft/vcpkg-tool     [/work/.mirror/microsoft+vcpkg-tool/repo]
#   VCPKG_TOOL_REF  its ref                  [VCPKG_TOOL_RELEASE_TAG of the vcpkg tree's
#                                             scripts/vcpkg-tool-metadata.txt]
#   VCPKG_SRC       microsoft/vcpkg          [/work/.mirror/microsoft+vcpkg/repo]
#   VCPKG_REF       its ref                  [127402f1c75bb3d5ff6bce04b285faa4930a5aca]
#   FMT_SRC         fmtlib/fmt               [/work/.mirror/fmtlib+fmt/repo]; ref from the tool's
#                                             cmake/Findfmt.cmake
#   CMRC_SRC        vector-of-bool/cmrc      [/work/.mirror/vector-of-bool+cmrc/repo]; ref from
#                                             cmake/FindCMakeRC.cmake
#   PATCHELF_SRC    NixOS/patchelf           [/work/.mirror/NixOS+patchelf/repo]; version from
#                                             scripts/cmake/vcpkg_find_acquire_program(PATCHELF).cmake
#   EIGEN_SRC       a git mirror of libeigen/eigen [/work/.mirror/live-clones+eigen/repo]; tag
#                                             from ports/eigen3/vcpkg.json (step 7 only)
#   XSIMD_SRC       xtensor-stack/xsimd      [/work/.mirror/xtensor-stack+xsimd/repo]; tag from
#                                             ports/xsimd/vcpkg.json (step 7 only)
#   WORK            everything built here    [/work/vcpkg-work]
#   JOBS            build parallelism        [2]
# Debian packages: cmake ninja-build g++ git libcurl4-openssl-dev libeigen3-dev libxsimd-dev
# nlohmann-json3-dev.
# Idempotent and resumable: sources are exported once per commit (stamp files), the tool and
# patchelf are built only when missing; the installs and consumer builds are redone every run.
# Exit status 0 only when no step failed; the last line says "vcpkg check: N passed, N failed, N skipped".
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VCPKG_TOOL_SRC="${1:-${VCPKG_TOOL_SRC:-/work/.mirror/microsoft+vcpkg-tool/repo}}"
VCPKG_SRC="${2:-${VCPKG_SRC:-/work/.mirror/microsoft+vcpkg/repo}}"
FMT_SRC="${3:-${FMT_SRC:-/work/.mirror/fmtlib+fmt/repo}}"
CMRC_SRC="${4:-${CMRC_SRC:-/work/.mirror/vector-of-bool+cmrc/repo}}"
PATCHELF_SRC="${5:-${PATCHELF_SRC:-/work/.mirror/NixOS+patchelf/repo}}"
VCPKG_REF="${VCPKG_REF:-127402f1c75bb3d5ff6bce04b285faa4930a5aca}"
WORK="${WORK:-/work/vcpkg-work}"
JOBS="${JOBS:-2}"
NICE=(nice -n 15)

say() { printf '\n=== %s\n' "$*"; }
die() { printf 'check.sh: %s\n' "$*" >&2; exit 1; }

for tool in cmake ninja c++ git gzip tar; do
  command -v "$tool" >/dev/null || die "needs $tool (Debian: cmake ninja-build g++ git)"
done
[[ -f /usr/include/x86_64-linux-gnu/curl/curl.h || -f /usr/include/curl/curl.h ]] ||
  die "needs libcurl's headers (Debian: libcurl4-openssl-dev)"

# Where the network can be cut off for a command (root, or user namespaces), do it.
OFFLINE=()
if unshare -n true 2>/dev/null; then OFFLINE=(unshare -n); fi

# a git directory (bare, as the fetched snapshots are) or a work tree with its .git
is_gitdir() { [[ -f "$1/HEAD" && -d "$1/objects" ]] && git --git-dir="$1" rev-parse -q --verify HEAD >/dev/null; }
is_git() { is_gitdir "$1" || [[ -e "$1/.git" ]]; }
git_of() { if is_gitdir "$1"; then git --git-dir="$1" "${@:2}"; else git -C "$1" "${@:2}"; fi; }
commit_of() { git_of "$1" rev-parse "$2^{commit}"; }

# export SRC (git dir at REF, or a tree) into DEST, once per commit
export_tree() {
  local src="$1" ref="$2" dest="$3" id
  if is_git "$src"; then id="$(commit_of "$src" "$ref")"; else id="tree:$(cd "$src" && pwd)"; fi
  if [[ -f "$dest/.check-stamp" && "$(cat "$dest/.check-stamp")" == "$id" ]]; then return; fi
  rm -rf "$dest"
  mkdir -p "$dest"
  if is_git "$src"; then git_of "$src" archive "$id" | tar -x -C "$dest"; else cp -a "$src/." "$dest/"; fi
  echo "$id" >"$dest/.check-stamp"
}

# the tarball GitHub serves for a tag (git archive | gzip -n), so upstream's URL_HASH still holds
make_tarball() {
  local src="$1" ref="$2" prefix="$3" out="$4"
  [[ -f "$out" ]] && return
  is_git "$src" || die "$src: a git directory is needed to make $out"
  mkdir -p "$(dirname "$out")"
  git_of "$src" archive --format=tar --prefix="$prefix/" "$ref" | gzip -n >"$out.tmp"
  mv "$out.tmp" "$out"
}

mkdir -p "$WORK/src" "$WORK/dl" "$WORK/downloads"
ROOT="$WORK/vcpkg"

say "vcpkg tree (microsoft/vcpkg)"
export_tree "$VCPKG_SRC" "$VCPKG_REF" "$ROOT"
is_git "$VCPKG_SRC" && echo "microsoft/vcpkg $(commit_of "$VCPKG_SRC" "$VCPKG_REF")"
tool_tag="$(sed -n 's/^VCPKG_TOOL_RELEASE_TAG=//p' "$ROOT/scripts/vcpkg-tool-metadata.txt")"
VCPKG_TOOL_REF="${VCPKG_TOOL_REF:-$tool_tag}"
echo "the tree pins vcpkg-tool $tool_tag; building $VCPKG_TOOL_REF"

say "vcpkg tool (microsoft/vcpkg-tool)"
TOOL_SRC="$WORK/src/vcpkg-tool"
export_tree "$VCPKG_TOOL_SRC" "$VCPKG_TOOL_REF" "$TOOL_SRC"
tool_commit=unknownhash
is_git "$VCPKG_TOOL_SRC" && tool_commit="$(commit_of "$VCPKG_TOOL_SRC" "$VCPKG_TOOL_REF")"
want_version="$VCPKG_TOOL_REF-$tool_commit"
have_version=""
[[ -x "$ROOT/vcpkg" ]] && have_version="$("$ROOT/vcpkg" version 2>/dev/null || true)"
if [[ "$have_version" == *"version $want_version"* ]]; then
  echo "present: ${have_version%%$'\n'*}"
else
  fmt_ref="$(sed -n 's|.*fmtlib/fmt/archive/refs/tags/\([^"]*\)\.tar\.gz.*|\1|;T;p;q' "$TOOL_SRC/cmake/Findfmt.cmake")"
  cmrc_ref="$(sed -n 's|.*cmrc/archive/refs/tags/\([^"]*\)\.tar\.gz.*|\1|;T;p;q' "$TOOL_SRC/cmake/FindCMakeRC.cmake")"
  [[ -n "$fmt_ref" && -n "$cmrc_ref" ]] || die "cannot read fmt's / cmrc's version from $TOOL_SRC/cmake"
  make_tarball "$FMT_SRC" "$fmt_ref" "fmt-$fmt_ref" "$WORK/dl/fmt-$fmt_ref.tar.gz"
  make_tarball "$CMRC_SRC" "$cmrc_ref" "cmrc-$cmrc_ref" "$WORK/dl/cmrc-$cmrc_ref.tar.gz"
  echo "fmt $fmt_ref, cmrc $cmrc_ref from local tarballs"
  # A release-like build: the tool reports the tag it was built from (the scripts' vcpkg_minimum_required
  # compares against it); curl linked from the system rather than dlopen'ed behind downloaded headers.
  "${OFFLINE[@]}" "${NICE[@]}" cmake -S "$TOOL_SRC" -B "$WORK/build-tool" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DVCPKG_DEVELOPMENT_WARNINGS=OFF \
    -DVCPKG_LIBCURL_DLSYM=OFF \
    "-DVCPKG_FMT_URL=file://$WORK/dl/fmt-$fmt_ref.tar.gz" \
    "-DVCPKG_CMAKERC_URL=file://$WORK/dl/cmrc-$cmrc_ref.tar.gz" \
    "-DVCPKG_BASE_VERSION=$VCPKG_TOOL_REF" "-DVCPKG_VERSION=$tool_commit"
  "${OFFLINE[@]}" "${NICE[@]}" cmake --build "$WORK/build-tool" --target vcpkg -j "$JOBS"
  cp "$WORK/build-tool/vcpkg" "$ROOT/vcpkg"
  have_version="$("$ROOT/vcpkg" version)"
  echo "built: ${have_version%%$'\n'*}"
fi
touch "$ROOT/vcpkg.disable_metrics"

say "patchelf (what vcpkg's RPATH fixup would download)"
patchelf_version="$(sed -n 's/^ *set(program_version \(.*\))$/\1/;T;p;q' \
  "$ROOT/scripts/cmake/vcpkg_find_acquire_program(PATCHELF).cmake")"
patchelf_dir="$WORK/downloads/tools/patchelf/$patchelf_version-$(uname -m)-linux"
if [[ -x "$patchelf_dir/bin/patchelf" ]]; then
  echo "present: $("$patchelf_dir/bin/patchelf" --version)"
else
  export_tree "$PATCHELF_SRC" "$patchelf_version" "$WORK/src/patchelf"
  "${NICE[@]}" cmake -S "$WORK/src/patchelf" -B "$WORK/build-patchelf" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "-DVERSION_STRING=$patchelf_version" "-DCMAKE_INSTALL_PREFIX=$patchelf_dir"
  "${NICE[@]}" cmake --build "$WORK/build-patchelf" -j "$JOBS"
  cmake --install "$WORK/build-patchelf"
  echo "built: $("$patchelf_dir/bin/patchelf" --version)"
fi

# HOME too: Eigen's CMake (the real eigen3 port below) registers its build trees in the user
# package registry, ~/.cmake/packages, where any later find_package(Eigen3) on the machine would see them.
mkdir -p "$WORK/home"
export HOME="$WORK/home" VCPKG_ROOT="$ROOT" VCPKG_FORCE_SYSTEM_BINARIES=1 VCPKG_DISABLE_METRICS=1 \
  VCPKG_BINARY_SOURCES=clear "X_VCPKG_ASSET_SOURCES=clear;x-block-origin" \
  VCPKG_DOWNLOADS="$WORK/downloads"
OVERLAYS=("--overlay-ports=$here/smear" "--overlay-ports=$here/system-ports")
roots() {  # install, packages and buildtrees folders of one install
  echo "--x-install-root=$WORK/$1" "--x-packages-root=$WORK/packages-$1" \
       "--x-buildtrees-root=$WORK/buildtrees-$1" "--downloads-root=$WORK/downloads"
}
TOOLCHAIN="$ROOT/scripts/buildsystems/vcpkg.cmake"
passed=0 failed=0 skipped=0

# configure, build and run consumer/ into build folder $1, with further cmake arguments
consumer() {
  local build="$WORK/$1"
  shift
  rm -rf "$build"
  if ! "${OFFLINE[@]}" "${NICE[@]}" cmake -S "$here/consumer" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
       "-DCMAKE_TOOLCHAIN_FILE=$TOOLCHAIN" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF "$@" \
       >"$build.configure.log" 2>&1; then
    cat "$build.configure.log"
    echo "consumer: configure failed ($build.configure.log)" >&2
    return 1
  fi
  # the vcpkg install the toolchain ran (manifest mode), then where the packages were found
  sed -n '/^-- Running vcpkg install/,/^-- Running vcpkg install - done/p' "$build.configure.log" | grep -v '^-- Installing: ' || true
  grep -E '^-- [A-Za-z0-9_]+_DIR: ' "$build.configure.log" || true
  "${NICE[@]}" cmake --build "$build" -j "$JOBS" || return 1
  "$build/consumer" || return 1
}

say "classic mode: vcpkg install smear"
rm -rf "$WORK/installed" "$WORK/packages-installed"
# shellcheck disable=SC2046
"${OFFLINE[@]}" "${NICE[@]}" "$ROOT/vcpkg" install smear "${OVERLAYS[@]}" $(roots installed)
# shellcheck disable=SC2046
"$ROOT/vcpkg" list "${OVERLAYS[@]}" $(roots installed)
say "classic mode: consumer"
consumer consumer-classic -DVCPKG_MANIFEST_MODE=OFF "-DVCPKG_INSTALLED_DIR=$WORK/installed" \
  "-DSMEAR_EXPECTED_PREFIX=$WORK/installed" || die "classic mode: the consumer failed"
passed=$((passed + 1))

say "classic mode: vcpkg install smear[core] (no io)"
rm -rf "$WORK/installed-core" "$WORK/packages-installed-core"
# shellcheck disable=SC2046
"${OFFLINE[@]}" "${NICE[@]}" "$ROOT/vcpkg" install 'smear[core]' "${OVERLAYS[@]}" $(roots installed-core)
[[ -f "$WORK/installed-core/x64-linux/share/smear/smearTargets.cmake" ]] || die "smear[core]: no smearTargets.cmake"
[[ ! -e "$WORK/installed-core/x64-linux/share/smear/smearIoTargets.cmake" ]] || die "smear[core] installed smear::io"
[[ ! -e "$WORK/installed-core/x64-linux/share/nlohmann-json" ]] || die "smear[core] pulled in nlohmann-json"
echo "smear[core]: smearTargets.cmake, no smearIoTargets.cmake, no nlohmann-json"
passed=$((passed + 1))

say "manifest mode: consumer/vcpkg.json through the toolchain"
consumer consumer-manifest \
  "-DVCPKG_INSTALL_OPTIONS=--x-buildtrees-root=$WORK/buildtrees-manifest;--x-packages-root=$WORK/packages-manifest" \
  "-DSMEAR_EXPECTED_PREFIX=$WORK/consumer-manifest/vcpkg_installed" || die "manifest mode: the consumer failed"
passed=$((passed + 1))

# vcpkg's own eigen3 and xsimd ports, their source tarballs made from git checkouts and put in
# the downloads folder under the names vcpkg_from_gitlab/vcpkg_from_github use (vcpkg checks the
# ports' SHA512s); nlohmann-json stays a stand-in. The consumer must find everything in the vcpkg
# tree with /usr hidden from find_package (CMAKE_IGNORE_PREFIX_PATH).
port_version() { sed -n 's/^ *"version[a-z-]*": *"\([^"]*\)".*/\1/;T;p;q' "$ROOT/ports/$1/vcpkg.json"; }
real_ports() {
  local eigen_version xsimd_version
  eigen_version="$(port_version eigen3)" xsimd_version="$(port_version xsimd)"
  make_tarball "$EIGEN_SRC" "$eigen_version" "eigen-$eigen_version" "$WORK/downloads/libeigen-eigen-$eigen_version.tar.gz" || return 1
  make_tarball "$XSIMD_SRC" "$xsimd_version" "xsimd-$xsimd_version" "$WORK/downloads/xtensor-stack-xsimd-$xsimd_version.tar.gz" || return 1
  echo "eigen3 $eigen_version, xsimd $xsimd_version: vcpkg's ports, sources from local tarballs"
  rm -rf "$WORK/installed-real" "$WORK/packages-installed-real"
  # shellcheck disable=SC2046
  "${OFFLINE[@]}" "${NICE[@]}" "$ROOT/vcpkg" install smear "--overlay-ports=$here/smear" \
    "--overlay-ports=$here/system-ports/nlohmann-json" $(roots installed-real) || return 1
  consumer consumer-real -DVCPKG_MANIFEST_MODE=OFF "-DVCPKG_INSTALLED_DIR=$WORK/installed-real" \
    "-DSMEAR_EXPECTED_PREFIX=$WORK/installed-real" -DCMAKE_IGNORE_PREFIX_PATH=/usr
}
say "classic mode, vcpkg's real eigen3 and xsimd ports"
EIGEN_SRC="${EIGEN_SRC:-/work/.mirror/live-clones+eigen/repo}"
XSIMD_SRC="${XSIMD_SRC:-/work/.mirror/xtensor-stack+xsimd/repo}"
if ! is_git "$EIGEN_SRC" || ! is_git "$XSIMD_SRC"; then
  echo "skipped: EIGEN_SRC ($EIGEN_SRC) and XSIMD_SRC ($XSIMD_SRC) must be git directories"
  skipped=$((skipped + 1))
elif real_ports; then
  passed=$((passed + 1))
else
  echo "FAILED: smear with vcpkg's real eigen3 and xsimd ports" >&2
  failed=$((failed + 1))
fi

say "vcpkg check: $passed passed, $failed failed, $skipped skipped"
[[ "$failed" == 0 ]]
