#!/usr/bin/env bash
# Install Apptainer on a Debian bookworm host without touching the system's libc.
#
#   containers/install-apptainer.sh [PREFIX]        # default PREFIX=/opt/apptainer (run as root)
#
# Bookworm has no apptainer package, and the one in Debian sid needs a newer glibc, libseccomp
# and libsqlite than bookworm's. So: download apptainer (sid) and those three libraries (trixie),
# unpack them under PREFIX with `dpkg -x`, put the new libraries in PREFIX/glibc and point the
# apptainer binaries' ELF interpreter and RPATH there (patchelf). The system's libc is untouched.
#
# Also installs the Debian tools apptainer needs (squashfs-tools, squashfuse, uidmap, fakeroot,
# debootstrap, patchelf), sets `root default capabilities = no` (root inside a Firecracker VM
# lacks CAP_SYS_RESOURCE, which `exec` otherwise asks for), creates an unprivileged build user
# with subuid/subgid ranges for `apptainer build --fakeroot` (see containers/build.sh), and
# links PREFIX/usr/bin/apptainer to /usr/local/bin/apptainer.
#
# Idempotent: a second run finds the installed version and only re-checks the setup.
# Env: APPTAINER_BUILD_USER (default: cnnbuild), APPTAINER_BIN_DIR (default: /usr/local/bin).
set -euo pipefail

PREFIX=${1:-/opt/apptainer}
VERSION=1.4.5
BUILD_USER=${APPTAINER_BUILD_USER:-cnnbuild}
BIN_DIR=${APPTAINER_BIN_DIR:-/usr/local/bin}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "install-apptainer: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages and writes $PREFIX)"
[ "$(dpkg --print-architecture)" = amd64 ] || die "only amd64 is supported (the libraries are x86_64)"
command -v apt-get >/dev/null || die "needs a Debian-based host with apt-get"

# --- host tools -------------------------------------------------------------------------------
HOST_PKGS="patchelf squashfs-tools squashfuse uidmap fakeroot debootstrap ca-certificates"
missing=""
for p in $HOST_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# --- apptainer itself ---------------------------------------------------------------------------
APPTAINER="$PREFIX/usr/bin/apptainer"
if [ -x "$APPTAINER" ] && "$APPTAINER" --version 2>/dev/null | grep -q "version $VERSION"; then
    log "apptainer $VERSION already in $PREFIX"
else
    tmp=$(mktemp -d /var/tmp/install-apptainer.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs"
    cat >"$tmp/sources.list" <<EOF
deb [signed-by=$KEYRING] $MIRROR sid main
deb [signed-by=$KEYRING] $MIRROR trixie main
EOF
    # A private package list: the host's apt state and caches stay as they are.
    apt_opts=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o "Dir::Etc::sourceparts=-"
              -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
    log "fetching the sid and trixie package lists"
    apt-get "${apt_opts[@]}" update -qq
    full=$(apt-cache "${apt_opts[@]}" madison apptainer | awk -v v="$VERSION" '$3 ~ "^"v"-" {print $3; exit}')
    [ -n "$full" ] || die "apptainer $VERSION is no longer in Debian sid ($(apt-cache "${apt_opts[@]}" madison apptainer | awk '{print $3}' | tr '\n' ' ')); update VERSION in $0"
    log "downloading apptainer=$full (sid), libc6 libseccomp2 libsqlite3-0 (trixie)"
    (cd "$tmp/debs" && apt-get "${apt_opts[@]}" download -qq "apptainer=$full" \
        libc6/trixie libseccomp2/trixie libsqlite3-0/trixie)

    rm -rf "$PREFIX"
    mkdir -p "$PREFIX"
    for deb in "$tmp"/debs/*.deb; do
        case "$(basename "$deb")" in apptainer_*) dpkg -x "$deb" "$PREFIX" ;; *) dpkg -x "$deb" "$tmp/libs" ;; esac
    done
    mkdir -p "$PREFIX/glibc"
    cp -a "$tmp"/libs/usr/lib/x86_64-linux-gnu/*.so* "$PREFIX/glibc/"
    cp -a "$tmp"/libs/usr/lib64/ld-linux-x86-64.so.2 "$PREFIX/glibc/" 2>/dev/null ||
        cp -aL "$tmp"/libs/lib64/ld-linux-x86-64.so.2 "$PREFIX/glibc/"
    # ld-linux in usr/lib64 may be a symlink into usr/lib/x86_64-linux-gnu: make it a real file.
    if [ -L "$PREFIX/glibc/ld-linux-x86-64.so.2" ]; then
        cp --remove-destination "$tmp"/libs/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$PREFIX/glibc/"
    fi
    for bin in usr/bin/apptainer usr/lib/x86_64-linux-gnu/apptainer/bin/starter; do
        # --force-rpath: RPATH (not RUNPATH) also applies to the libraries' own dependencies
        # (libsqlite3 needs the new libm).
        patchelf --set-interpreter "$PREFIX/glibc/ld-linux-x86-64.so.2" --force-rpath \
            --set-rpath "$PREFIX/glibc" "$PREFIX/$bin"
    done
    log "unpacked apptainer $full into $PREFIX"
fi

# --- configuration of the relocated install ----------------------------------------------------
# Apptainer, unpacked under PREFIX, looks for its config in PREFIX/usr/etc/apptainer and its
# state in PREFIX/usr/{,lib/}var/lib/apptainer.
mkdir -p "$PREFIX/usr/etc"
[ -d "$PREFIX/usr/etc/apptainer" ] || cp -a "$PREFIX/etc/apptainer" "$PREFIX/usr/etc/apptainer"
[ -e "$PREFIX/usr/lib/etc" ] || ln -s ../etc "$PREFIX/usr/lib/etc"
mkdir -p "$PREFIX/usr/var/lib/apptainer/mnt/session" "$PREFIX/usr/lib/var/lib/apptainer/mnt/session"
conf="$PREFIX/usr/etc/apptainer/apptainer.conf"
if grep -qE '^root default capabilities *= *no' "$conf"; then :; else
    sed -i -E 's/^(root default capabilities *=).*/\1 no/' "$conf"
    grep -qE '^root default capabilities *= *no' "$conf" || echo "root default capabilities = no" >>"$conf"
fi

mkdir -p "$BIN_DIR"
ln -sfn "$APPTAINER" "$BIN_DIR/apptainer"

# --- unprivileged build user (apptainer build --fakeroot) --------------------------------------
if ! id "$BUILD_USER" >/dev/null 2>&1; then
    useradd --system --create-home --home-dir "/var/tmp/$BUILD_USER" --shell /bin/bash "$BUILD_USER"
    log "created build user $BUILD_USER"
fi
for f in /etc/subuid /etc/subgid; do
    touch "$f"
    grep -q "^$BUILD_USER:" "$f" || echo "$BUILD_USER:1000000:65536" >>"$f"
done

"$BIN_DIR/apptainer" --version >/dev/null || die "the installed apptainer does not run: $BIN_DIR/apptainer --version"
log "ok: $("$BIN_DIR/apptainer" --version) at $BIN_DIR/apptainer -> $APPTAINER (build user: $BUILD_USER)"
