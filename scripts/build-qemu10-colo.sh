#!/bin/sh
# build-qemu10-colo.sh [OUTDIR] — build QEMU 10.0.2 (x86_64-softmmu) with COLO working, from
# Debian's orig tarball (bookworm-backports) and native/qemu-10.0.2-colo.patch.
# Default OUTDIR: .build/qemu-10.0.2-colo in the project.
#
# The patch (written for this project): the primary enters COLO when migration_completion() finds
# the state DEVICE (stock 10.0 completes a plain migration instead); the secondary's multifd
# threads receive into the COLO cache, record the packet's pages (zero pages too) in the COLO
# bitmap during COLO and copy them to guest RAM before COLO (the semantics of upstream's
# "multifd: Add COLO support").
#
# Result: OUTDIR/qemu-system-x86_64, a wrapper passing -L OUTDIR/build/pc-bios -L /usr/share/qemu
# -L /usr/share/seabios to OUTDIR/build/qemu-system-x86_64 (linked with -rdynamic so that
# native/colo-shim.c finds tlb_flush, qemu_cpu_kick and current_cpu).
#
# Cached: OUTDIR/stamp.txt holds sha256(orig tarball + patch + this script); when it matches and
# the binary exists, nothing is done.  Build deps come from Debian (meson 1.7 and python3-pycotap
# from bookworm-backports; the suite is added by scripts/lib-backports.sh).  The build takes 3-4
# minutes on 2 cores.  FORCE=1 rebuilds.  JOBS=N overrides ninja's parallelism.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/.build/qemu-10.0.2-colo}
VERSION=10.0.2
PATCH=$ROOT/native/qemu-10.0.2-colo.patch
SELF=$ROOT/scripts/build-qemu10-colo.sh
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if command -v flock >/dev/null 2>&1 && [ -z "${QEMU10COLO_LOCKED:-}" ]; then
    export QEMU10COLO_LOCKED=1
    exec flock "$OUT/.lock" "$SELF" "$OUT"
fi
WRAP=$OUT/qemu-system-x86_64
BIN=$OUT/build/qemu-system-x86_64

# shellcheck source=/dev/null
. "$ROOT/scripts/lib-backports.sh"

TARBALL=$(ls "$OUT"/src/qemu_"$VERSION"+ds.orig.tar.xz 2>/dev/null | head -1 || true)
key() { cat "$TARBALL" "$PATCH" "$SELF" | sha256sum | cut -c1-32; }
if [ "${FORCE:-0}" != 1 ] && [ -n "$TARBALL" ] && [ -x "$BIN" ] && [ -x "$WRAP" ] \
    && [ -f "$OUT/stamp.txt" ] && grep -qx "key=$(key)" "$OUT/stamp.txt"; then
    echo "qemu $VERSION (COLO) up to date in $OUT"
    exit 0
fi

ensure_backports
need=""
for p in gcc libc6-dev pkg-config ninja-build libglib2.0-dev libpixman-1-dev libfdt-dev libslirp-dev \
         libzstd-dev zlib1g-dev flex bison python3-venv xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
[ -z "$need" ] || $SUDO apt-get install -y -q $need
if ! meson --version 2>/dev/null | grep -q '^1\.[7-9]' || ! /usr/bin/python3 -c 'import pycotap' 2>/dev/null; then
    $SUDO apt-get install -y -q -t bookworm-backports meson python3-pycotap
fi

if [ -z "$TARBALL" ]; then
    mkdir -p "$OUT/src"
    # the Debian packaging files (.dsc, .debian.tar.xz) may not be served: only the orig tarball
    # is needed
    (cd "$OUT/src" && apt-get source --download-only -q -t bookworm-backports qemu || true)
    TARBALL=$(ls "$OUT"/src/qemu_"$VERSION"+ds.orig.tar.xz 2>/dev/null | head -1 || true)
    [ -n "$TARBALL" ] || { echo "build-qemu10-colo: no qemu_$VERSION+ds.orig.tar.xz from bookworm-backports" >&2; exit 1; }
fi

rm -rf "$OUT/qemu-$VERSION" "$OUT/build" "$OUT/stamp.txt"
tar -C "$OUT" -xf "$TARBALL"
SRC=$OUT/qemu-$VERSION
(cd "$SRC" && patch -p1 --no-backup-if-mismatch < "$PATCH")
# the +ds tarball has no edk2 blobs: do not try to unpack them
sed -i 's/^\( *\)unpack_edk2_blobs = bzip2.found()/\1unpack_edk2_blobs = false/' "$SRC/meson.build"

mkdir -p "$OUT/build"
cd "$OUT/build"
"$SRC/configure" --target-list=x86_64-softmmu --python=/usr/bin/python3 --disable-download \
    --disable-docs --disable-werror --disable-debug-info --enable-slirp --enable-tcg \
    --disable-gtk --disable-sdl --disable-opengl --disable-spice --disable-vnc --disable-curses \
    --disable-xen --disable-rbd --disable-glusterfs --disable-libiscsi --disable-libnfs \
    --disable-libssh --disable-curl --disable-capstone --disable-vhost-user-blk-server \
    --disable-guest-agent --disable-tools --disable-rust --disable-install-blobs \
    --disable-seccomp --disable-linux-io-uring --disable-pipewire --disable-pa --disable-alsa \
    --disable-jack --disable-oss --disable-sndio --disable-brlapi --disable-virglrenderer \
    --disable-libusb --disable-usb-redir --disable-smartcard --disable-modules \
    --extra-ldflags=-rdynamic
ninja -j "${JOBS:-$(nproc)}" qemu-system-x86_64
cat > "$WRAP" <<EOF
#!/bin/sh
# QEMU $VERSION built by scripts/build-qemu10-colo.sh with native/qemu-10.0.2-colo.patch
exec $BIN -L $OUT/build/pc-bios -L /usr/share/qemu -L /usr/share/seabios "\$@"
EOF
chmod +x "$WRAP"
"$WRAP" --version | head -1
"$WRAP" --version | grep -q "version $VERSION" || { echo "build-qemu10-colo: wrong version" >&2; exit 1; }
echo "key=$(key)" > "$OUT/stamp.txt"
echo "built qemu $VERSION (COLO) in $OUT"
