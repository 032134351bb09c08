#!/bin/sh
# install-qemu10.sh [PREFIX] — unpack Debian's stock QEMU 10.0.2 (bookworm-backports) beside the
# system's QEMU 7.2, without installing it.  Default PREFIX: .build/qemu-10.0.2 in the project.
#
# Result: PREFIX/qemu-system-x86_64, a wrapper that sets QEMU_MODULE_DIR to the unpacked modules
# (otherwise 10.0 loads 7.2's modules and aborts: "Only modules from the same build can be
# loaded") and passes -L PREFIX/usr/share/qemu -L /usr/share/qemu.  Its shared libraries come with
# the system's qemu-system-x86 7.2 install.
#
# Idempotent: PREFIX/stamp.txt records the recipe and the package versions; when it matches, the
# script only checks the wrapper.  Adds /etc/apt/sources.list.d/bookworm-backports.sources (deb +
# deb-src, the archive URI of debian.sources) when missing, and runs apt-get update only when the
# backports lists are absent.  FORCE=1 re-unpacks.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${1:-$ROOT/.build/qemu-10.0.2}
VERSION=10.0.2
RECIPE_VERSION=1
PKGS="qemu-system-x86 qemu-system-common qemu-system-data qemu-system-gui qemu-system-modules-opengl qemu-system-modules-spice qemu-block-extra"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
if command -v flock >/dev/null 2>&1 && [ -z "${QEMU10_LOCKED:-}" ]; then
    export QEMU10_LOCKED=1
    exec flock "$PREFIX/.lock" "$0" "$PREFIX"
fi
RECIPE=$( { echo "v$RECIPE_VERSION $PKGS"; cat "$0"; } | sha256sum | cut -c1-16)
WRAP=$PREFIX/qemu-system-x86_64

if [ "${FORCE:-0}" != 1 ] && [ -f "$PREFIX/stamp.txt" ] && grep -qx "recipe=$RECIPE" "$PREFIX/stamp.txt" \
    && [ -x "$WRAP" ] && "$WRAP" --version 2>/dev/null | grep -q "version $VERSION"; then
    echo "qemu $VERSION up to date in $PREFIX"
    exit 0
fi

# shellcheck source=/dev/null
. "$ROOT/scripts/lib-backports.sh"
ensure_backports

WORK=$PREFIX/.debs
rm -rf "$WORK"; mkdir -p "$WORK"
(cd "$WORK" && apt-get download -q -t bookworm-backports $PKGS)
ls "$WORK"/qemu-system-x86_1*"$VERSION"* >/dev/null 2>&1 || {
    echo "install-qemu10: bookworm-backports did not give qemu-system-x86 $VERSION:" >&2; ls "$WORK" >&2; exit 1; }
rm -rf "$PREFIX/usr" "$PREFIX/etc" "$PREFIX/lib"
for d in "$WORK"/*.deb; do dpkg -x "$d" "$PREFIX"; done

cat > "$WRAP" <<EOF
#!/bin/sh
# stock QEMU $VERSION from Debian bookworm-backports, unpacked by scripts/install-qemu10.sh
export QEMU_MODULE_DIR=$PREFIX/usr/lib/x86_64-linux-gnu/qemu
exec $PREFIX/usr/bin/qemu-system-x86_64 -L $PREFIX/usr/share/qemu -L /usr/share/qemu "\$@"
EOF
chmod +x "$WRAP"
"$WRAP" --version | head -1
"$WRAP" --version | grep -q "version $VERSION" || { echo "install-qemu10: wrong version" >&2; exit 1; }
{ echo "recipe=$RECIPE"; for d in "$WORK"/*.deb; do basename "$d"; done; } > "$PREFIX/stamp.txt"
rm -rf "$WORK"
echo "installed qemu $VERSION in $PREFIX"
