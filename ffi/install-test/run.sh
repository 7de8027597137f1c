#!/usr/bin/env bash
# The C library as an installed package: `make install` into a temporary
# prefix, then the C example (examples/c/afd_ranks.c, a 2 attention x 2 FFN
# mesh that checks its sums) built
#   * with `pkg-config --cflags --libs afmesh`, run with LD_LIBRARY_PATH at
#     the prefix (and checked to load the installed libafmesh.so.0);
#   * by a CMake project, find_package(afmesh) -> afmesh::afmesh and
#     afmesh::afmesh_static;
# each run as four processes (bounded by `timeout`, killed on every path);
# then `make uninstall` leaves no file behind. Needs cc, make, pkg-config,
# cmake (scripts/test installs them).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/afmesh-install.XXXXXX")"
pids=()
# Ranks run under `timeout`, which passes a TERM on to the rank.
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "install-test: $*" >&2; exit 1; }

prefix="$tmp/prefix"
make -s build >/dev/null
make -s install PREFIX="$prefix"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' ffi/Cargo.toml | head -n1)"
lib="$prefix/lib"
for f in "$prefix/include/afmesh.h" "$lib/libafmesh.so.$version" "$lib/libafmesh.a" \
    "$lib/pkgconfig/afmesh.pc" "$lib/cmake/afmesh/afmeshConfig.cmake" \
    "$lib/cmake/afmesh/afmeshConfigVersion.cmake"; do
    [ -f "$f" ] || fail "missing $f"
done
[ "$(readlink "$lib/libafmesh.so.0")" = "libafmesh.so.$version" ] || fail "libafmesh.so.0 does not point at libafmesh.so.$version"
[ "$(readlink "$lib/libafmesh.so")" = "libafmesh.so.0" ] || fail "libafmesh.so does not point at libafmesh.so.0"
soname="$(readelf -d "$lib/libafmesh.so.$version" | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')"
[ "$soname" = "libafmesh.so.0" ] || fail "SONAME is '$soname', not libafmesh.so.0"

free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    else
        echo $(( 20000 + ($$ + RANDOM) % 20000 ))
    fi
}

# Four ranks of one mesh (attention 0 runs the rendezvous server), each
# bounded; when one fails the others are stopped at once.
run_mesh() {
    local bin="$1" port rc=0
    port="$(free_port)"
    pids=()
    for who in "ffn 0" "ffn 1" "attention 1"; do
        # shellcheck disable=SC2086
        timeout -k 5 60 "$bin" $who "127.0.0.1:$port" & pids+=($!)
    done
    timeout -k 5 60 "$bin" attention 0 "127.0.0.1:$port" || rc=$?
    if [ "$rc" -ne 0 ]; then
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    fi
    for p in "${pids[@]}"; do wait "$p" || rc=$(( rc == 0 ? $? : rc )); done
    pids=()
    [ "$rc" -eq 0 ] || fail "$bin: a rank failed (exit $rc)"
}

export PKG_CONFIG_PATH="$lib/pkgconfig"
[ "$(pkg-config --modversion afmesh)" = "$version" ] || fail "pkg-config reports another version"
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror $(pkg-config --cflags afmesh) examples/c/afd_ranks.c \
    $(pkg-config --libs afmesh) -o "$tmp/afd_pkgconfig"
# (ldd's output is taken whole first: `grep -q` ending a pipe early would
# fail it under pipefail.)
loads() { local deps; deps="$(LD_LIBRARY_PATH="${2:-}" ldd "$1")"; grep -q "$3" <<<"$deps"; }
loads "$tmp/afd_pkgconfig" "$lib" "libafmesh.so.0 => $lib/libafmesh.so.0" \
    || fail "afd_pkgconfig does not load the installed libafmesh.so.0"
LD_LIBRARY_PATH="$lib" run_mesh "$tmp/afd_pkgconfig"
echo "install-test: pkg-config build ok"

cmake -S ffi/install-test -B "$tmp/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$tmp/cmake" >/dev/null
loads "$tmp/cmake/afd_shared" "" "libafmesh.so.0 => $lib/libafmesh.so.0" \
    || fail "afd_shared does not load the installed libafmesh.so.0"
if loads "$tmp/cmake/afd_static" "" libafmesh; then fail "afd_static loads libafmesh dynamically"; fi
run_mesh "$tmp/cmake/afd_shared"
run_mesh "$tmp/cmake/afd_static"
echo "install-test: CMake build ok (shared and static)"

# A find_package asking for a newer version is refused.
mkdir -p "$tmp/newer"
printf 'cmake_minimum_required(VERSION 3.16)\nproject(newer NONE)\nfind_package(afmesh 99 REQUIRED)\n' \
    > "$tmp/newer/CMakeLists.txt"
if cmake -S "$tmp/newer" -B "$tmp/newer/build" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null 2>&1; then
    fail "find_package(afmesh 99) accepted version $version"
fi

make -s uninstall PREFIX="$prefix"
left="$(find "$prefix" ! -type d)"
[ -z "$left" ] || fail "make uninstall left: $left"
echo "install-test: ok"
