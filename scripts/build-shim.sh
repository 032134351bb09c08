#!/bin/sh
# build-shim.sh [OUTFILE] — compile native/colo-shim.c (LD_PRELOAD work-arounds
# for QEMU 7.2 COLO under TCG) into a shared object.  Default OUTFILE:
# .build/colo-shim.so in the project.  Skips the build when OUTFILE is newer
# than the source (FORCE=1 rebuilds).  Needs gcc (or $CC) and glibc headers.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$ROOT/native/colo-shim.c
OUT=${1:-$ROOT/.build/colo-shim.so}
CC=${CC:-gcc}
command -v "$CC" >/dev/null 2>&1 || { echo "build-shim: $CC not found" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
if command -v flock >/dev/null 2>&1 && [ -z "${COLO_SHIM_LOCKED:-}" ]; then
    export COLO_SHIM_LOCKED=1
    exec flock "$OUT.lock" "$ROOT/scripts/build-shim.sh" "$OUT"
fi
if [ "${FORCE:-0}" != 1 ] && [ -s "$OUT" ] && [ "$OUT" -nt "$SRC" ] && [ "$OUT" -nt "$0" ]; then
    echo "shim up to date: $OUT"
    exit 0
fi
TMP=$OUT.tmp.$$
trap 'rm -f "$TMP"' EXIT INT TERM
"$CC" -O2 -g -Wall -Wextra -Wno-unused-parameter -shared -fPIC -o "$TMP" "$SRC" -ldl -lpthread
mv "$TMP" "$OUT"
echo "built $OUT"
