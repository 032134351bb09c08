#!/bin/sh
# build-guest.sh OUTDIR — build the tiny Linux guest used by the colo-receiver
# QEMU tests and benchmarks (diskless; virtio-blk + ext4 for colo.sink=disk).
#
# Output (in OUTDIR):
#   vmlinuz             Debian cloud kernel (linux-image-*-cloud-amd64)
#   initramfs.cpio.gz   busybox-static userland + virtio-net modules + /init
#   stamp.txt           recipe hash + package versions (cache key)
#
# Nothing is installed on the host: the two .deb packages are fetched with
# `apt-get download` and unpacked with `dpkg-deb -x`.  If OUTDIR already holds
# vmlinuz + initramfs.cpio.gz and a stamp with the same recipe (hash of this
# script and of the requested packages), the build is skipped.  FORCE=1 rebuilds.
#
# Env: KPKG   kernel package (default: what linux-image-cloud-amd64 depends on)
#      BBPKG  busybox package (default: busybox-static)
#
# The guest (console on ttyS0, boot with -append 'console=ttyS0 ...'):
#   * loads virtio-net, configures eth0 10.0.2.15/24 (QEMU user net / slirp)
#   * prints "COLO-GUEST-READY ..." on ttyS0 when its services are up
#   * prints a heartbeat "HB <n>" on ttyS0 every ~0.5 s (n = 0, 1, 2, ...);
#     the counter lives in guest memory, so a VM resumed from a checkpoint
#     continues the sequence
#   * TCP 5000: upload sink.  Every connection is stored as its own file
#     /run/up/<n>.bin (n = 0, 1, ...; tmpfs).  Only the newest colo.keep files
#     are kept: starting upload n deletes /run/up/<n-keep>.bin, so a long
#     upload workload does not fill the guest's memory.  When the client half-closes
#     (shutdown SHUT_WR) and the data is stored, the sink answers one line
#     "STORED /run/up/<n>.bin <bytes>" and closes ("STORED /dev/null -"
#     with colo.sink=null).
#   * TCP 5001: remote /bin/sh (e.g. send "sha256sum /run/up/0.bin\nexit\n")
#   Kernel command-line options read by /init:
#     colo.sink=tmpfs|null|disk   null: uploads are read and dropped (still
#                            answered); disk: /dev/vda (ext4, made by the host) is
#                            mounted on /mnt/disk, uploads go to /mnt/disk/up/<n>.bin
#                            and are answered only after `sync` (on the disk)
#     colo.keep=N            upload files kept (default 16; 0 = all)
#     colo.hb=MS             heartbeat period in ms (default 500; 0 = off)
#     colo.dirty=MBPS[,MB]   start an in-guest memory dirtier
set -eu

RECIPE_VERSION=3
if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
BBPKG=${BBPKG:-busybox-static}
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
RECIPE=$( { echo "v$RECIPE_VERSION kpkg=${KPKG:-auto} bbpkg=$BBPKG"; cat "$SELF"; } | sha256sum | cut -c1-16)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# serialise concurrent builds into the same OUTDIR (parallel test files)
if command -v flock >/dev/null 2>&1 && [ -z "${COLO_GUEST_LOCKED:-}" ]; then
    export COLO_GUEST_LOCKED=1
    exec flock "$OUT/.lock" "$SELF" "$@"
fi
if [ "${FORCE:-0}" != 1 ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.cpio.gz" ] \
    && [ -f "$OUT/stamp.txt" ] && grep -qx "recipe=$RECIPE" "$OUT/stamp.txt"; then
    echo "guest up to date in $OUT (recipe $RECIPE)"
    exit 0
fi

for t in apt-get apt-cache dpkg-deb gzip sha256sum; do
    command -v $t >/dev/null 2>&1 || { echo "build-guest: '$t' not found (Debian/Ubuntu host needed)" >&2; exit 1; }
done

APT_UPDATED=0
apt_update() {
    if [ $APT_UPDATED = 0 ]; then
        if [ "$(id -u)" = 0 ]; then
            echo "build-guest: running apt-get update" >&2
            apt-get update -qq >&2 || true
        else
            echo "build-guest: package lists look stale and we are not root (apt-get update skipped)" >&2
        fi
        APT_UPDATED=1
    fi
}
resolve_kpkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}
if [ -z "${KPKG:-}" ]; then
    KPKG=$(resolve_kpkg || true)
    if [ -z "$KPKG" ]; then apt_update; KPKG=$(resolve_kpkg || true); fi
fi
[ -n "$KPKG" ] || { echo "build-guest: cannot resolve the cloud kernel package (linux-image-cloud-amd64)" >&2; exit 1; }
KVER=${KPKG#linux-image-}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/colo-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
mkdir -p "$WORK/debs"
# apt-get download writes into the current directory; as root it may warn about
# the _apt sandbox user, which is harmless.
fetch() { (cd "$WORK/debs" && apt-get download "$KPKG" "$BBPKG" >"$WORK/apt.log" 2>&1); }
if ! fetch; then
    apt_update
    fetch || { cat "$WORK/apt.log" >&2; echo "build-guest: apt-get download $KPKG $BBPKG failed" >&2; exit 1; }
fi
KDEB=$(ls "$WORK"/debs/"${KPKG}"_*.deb)
BDEB=$(ls "$WORK"/debs/"${BBPKG}"_*.deb)
dpkg-deb -x "$KDEB" "$WORK/k"
dpkg-deb -x "$BDEB" "$WORK/b"
BB=$WORK/b/bin/busybox
[ -x "$BB" ] || { echo "build-guest: no busybox binary in $BDEB" >&2; exit 1; }

R=$WORK/rootfs
mkdir -p "$R/bin" "$R/proc" "$R/sys" "$R/dev" "$R/run" "$R/tmp" "$R/etc" "$R/lib/modules"
cp "$BB" "$R/bin/busybox"
for applet in $("$BB" --list); do
    [ -e "$R/bin/$applet" ] || ln -s busybox "$R/bin/$applet"
done
ln -s bin "$R/sbin"

# virtio-net and its dependencies, in load order
MODS="drivers/virtio/virtio_ring drivers/virtio/virtio
      drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci_legacy_dev
      drivers/virtio/virtio_pci net/core/failover drivers/net/net_failover
      drivers/net/virtio_net drivers/block/virtio_blk"
: > "$R/lib/modules/order"
for m in $MODS; do
    src=$WORK/k/lib/modules/$KVER/kernel/$m.ko
    if [ -f "$src" ]; then
        cp "$src" "$R/lib/modules/"
        echo "$(basename "$m").ko" >> "$R/lib/modules/order"
    elif [ -f "$src.xz" ] || [ -f "$src.zst" ]; then
        echo "build-guest: compressed modules ($m) are not supported" >&2; exit 1
    fi
    # a module that is missing is assumed to be built into this kernel
done

cat > "$R/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=80% tmpfs /run
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m || echo "init: insmod $m failed"
done
SINK=tmpfs HB=500 DIRTY= KEEP=16
for a in $(cat /proc/cmdline); do
    case $a in
        colo.sink=*) SINK=${a#colo.sink=} ;;
        colo.hb=*) HB=${a#colo.hb=} ;;
        colo.keep=*) KEEP=${a#colo.keep=} ;;
        colo.dirty=*) DIRTY=${a#colo.dirty=} ;;
    esac
done
UP=/run/up
if [ "$SINK" = disk ]; then
    # The disk is an ext4 image made on the host (mkfs.ext4); a failed mount is reported,
    # the guest still comes up so the test sees why.
    mkdir -p /mnt/disk
    if mount -t ext4 /dev/vda /mnt/disk; then
        UP=/mnt/disk/up
    else
        echo "init: mount /dev/vda failed" > /dev/ttyS0
    fi
fi
mkdir -p $UP
[ $UP = /run/up ] || ln -s $UP /run/up
echo 0 > /run/up/.next
echo "$SINK" > /run/sinkmode
echo "$KEEP" > /run/up/.keep
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2 2>/dev/null
nc -ll -p 5000 -e /bin/upload-sink &
nc -ll -p 5001 -e /bin/sh &
if [ -n "$DIRTY" ]; then
    setsid /bin/dirtier $(echo "$DIRTY" | tr , ' ') >/run/dirtier.log 2>&1 &
fi
if [ "$HB" -gt 0 ] 2>/dev/null; then
    setsid /bin/heartbeat "$HB" </dev/null >/dev/ttyS0 2>&1 &
fi
echo "COLO-GUEST-READY sink=$SINK keep=$KEEP hb=$HB dirty=$DIRTY" > /dev/ttyS0
while :; do sleep 3600; done
EOF

cat > "$R/bin/heartbeat" <<'EOF'
#!/bin/sh
# heartbeat PERIOD_MS: print "HB <n>" on stdout (ttyS0) every PERIOD_MS ms
P=$(($1 * 1000))
n=0
while :; do
    echo "HB $n"
    n=$((n + 1))
    usleep $P
done
EOF

cat > "$R/bin/upload-sink" <<'EOF'
#!/bin/sh
# One upload connection (stdin/stdout = the TCP socket): store it in its own
# file /run/up/<n>.bin, then report where it went.
n=$(cat /run/up/.next 2>/dev/null || echo 0)
# claim a free number atomically (noclobber create fails if the file exists)
while ! (set -C; : > /run/up/$n.bin) 2>/dev/null; do
    n=$((n + 1))
done
echo $((n + 1)) > /run/up/.next
read keep < /run/up/.keep
if [ "${keep:-0}" -gt 0 ] && [ $n -ge $keep ]; then
    rm -f /run/up/$((n - keep)).bin
fi
read mode < /run/sinkmode
if [ "$mode" = null ]; then
    # drop (busybox wc -c would be a slow byte loop, so the size is unknown: "-")
    cat > /dev/null
    echo "STORED /dev/null -"
else
    cat >> /run/up/$n.bin
    # disk: on stable storage before the answer (the test checks synced files after a failover)
    [ "$mode" = disk ] && sync
    # stat, not wc: wc would read the whole file again
    echo "STORED /run/up/$n.bin $(stat -c %s /run/up/$n.bin)"
fi
EOF

cat > "$R/bin/dirtier" <<'EOF'
#!/bin/sh
# dirtier MBPS [REGION_MB]: rewrite MBPS/10 MiB of a REGION_MB tmpfs file
# every 100 ms with random data, walking through the region; stops when
# /run/dirtier.stop exists.
RATE=${1:-50} REGION=${2:-64}
STEP=$((RATE / 10)); [ $STEP -ge 1 ] || STEP=1
dd if=/dev/urandom of=/run/dirty-src.bin bs=1M count=$REGION 2>/dev/null
cp /run/dirty-src.bin /run/dirty.bin
OFF=0
while [ ! -e /run/dirtier.stop ]; do
    [ $((OFF + STEP)) -le $REGION ] || OFF=0
    dd if=/run/dirty-src.bin of=/run/dirty.bin bs=1M count=$STEP skip=$OFF seek=$OFF conv=notrunc 2>/dev/null
    OFF=$((OFF + STEP))
    usleep 100000
done
EOF
chmod 755 "$R/init" "$R/bin/heartbeat" "$R/bin/upload-sink" "$R/bin/dirtier"

(cd "$R" && find . | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null) | gzip -9 > "$WORK/initramfs.cpio.gz"
cp "$WORK/k/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
{
    echo "recipe=$RECIPE"
    echo "kernel=$KPKG $(dpkg-deb -f "$KDEB" Version)"
    echo "busybox=$BBPKG $(dpkg-deb -f "$BDEB" Version)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$WORK/stamp.txt"
# install atomically-ish: stamp last, so an interrupted copy is rebuilt next time
rm -f "$OUT/stamp.txt"
mv "$WORK/vmlinuz" "$OUT/vmlinuz"
mv "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
mv "$WORK/stamp.txt" "$OUT/stamp.txt"
cat "$OUT/stamp.txt"
