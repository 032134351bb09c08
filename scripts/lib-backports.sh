# lib-backports.sh — sourced by install-qemu10.sh and build-qemu10-colo.sh.
# ensure_backports: adds /etc/apt/sources.list.d/bookworm-backports.sources (deb + deb-src, the
# archive URI of debian.sources, suite bookworm-backports) when missing, and runs apt-get update
# when the bookworm-backports lists (binary and source) are absent.  Never edits debian.sources.
ensure_backports() {
    BP_FILE=/etc/apt/sources.list.d/bookworm-backports.sources
    if [ ! -f "$BP_FILE" ]; then
        uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$uri" ] || uri=http://deb.debian.org/debian
        key=/usr/share/keyrings/debian-archive-keyring.gpg
        printf 'Types: deb deb-src\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
            "$uri" "$key" | ${SUDO:-} tee "$BP_FILE" >/dev/null
        echo "added $BP_FILE ($uri)" >&2
    fi
    if ! ls /var/lib/apt/lists/*bookworm-backports*_Packages* >/dev/null 2>&1 \
        || ! ls /var/lib/apt/lists/*bookworm-backports*_Sources* >/dev/null 2>&1; then
        ${SUDO:-} apt-get update -q
    fi
}
