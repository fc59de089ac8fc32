#!/usr/bin/env bash
# Build the workflow's Apptainer images (containers/torch.sif, containers/tensorflow.sif).
#
#   containers/build.sh [--local-wheels] [--tf-cpu] [--torch-cuda VARIANT] [--ci] [--force] [--notest]
#                       [torch] [tensorflow]
#
#   (no image named)  build both
#   --local-wheels    pip also reads the wheel directories of this machine, bound read-only into
#                     the build: /opt/wheels (find-links), /opt/pypi/simple, /opt/pypi-more/simple
#                     (override with CNNBENCH_WHEEL_DIRS / CNNBENCH_PIP_INDEXES); torch's GBs of
#                     CUDA wheels then come from disk, not from PyPI
#   --tf-cpu          tensorflow-cpu==2.21.0 instead of tensorflow[and-cuda]==2.21.0 (no GPU)
#   --torch-cuda V    torch's CUDA build (torch.def's TORCH_CUDA): cu126, cu128, cu130 or cpu from
#                     download.pytorch.org; default pypi (PyPI's wheels: CUDA 13.0 for torch 2.14.1)
#   --ci              = --local-wheels --tf-cpu, and zstd compression (CNNBENCH_MKSQUASHFS_ARGS)
#   (always)          the host's CA bundle (CNNBENCH_PIP_CERT, PIP_CERT, REQUESTS_CA_BUNDLE or
#                     /etc/ssl/certs/ca-certificates.crt) is bound into the build for pip
#   --force           rebuild even if the cached image exists
#   --notest          skip the images' %test
#   CNNBENCH_MKSQUASHFS_ARGS   mksquashfs options (default: Apptainer's, gzip, the most portable;
#                     --ci: "-comp zstd -Xcompression-level 3", ~5x faster to build; needs a kernel
#                     or squashfuse with zstd, as Debian >= 11, RHEL >= 8 have)
#
# Each image is cached as containers/<name>-<hash>.sif, hash = sha256 of the definition file and
# the build arguments, and containers/<name>.sif links to it: a rerun with the same inputs
# reuses the image without building. Built images are also kept in $BUILD_DIR/images (hard-linked
# into containers/), so a fresh clone on the same machine (CI) reuses them too. Build caches, temp
# files and images go under BUILD_DIR=${CNNBENCH_BUILD_DIR:-/var/tmp/cnnbench-apptainer}, not
# into the repository; building an image removes the older builds of that image.
#
# Apptainer builds need --fakeroot (an unprivileged user with /etc/subuid and /etc/subgid
# ranges): run as root, this script builds as ${APPTAINER_BUILD_USER:-cnnbuild}, the user
# containers/install-apptainer.sh creates.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD_DIR=${CNNBENCH_BUILD_DIR:-/var/tmp/cnnbench-apptainer}
BUILD_USER=${APPTAINER_BUILD_USER:-cnnbuild}
WHEEL_DIRS=${CNNBENCH_WHEEL_DIRS:-/opt/wheels}
PIP_INDEXES=${CNNBENCH_PIP_INDEXES:-/opt/pypi /opt/pypi-more}
MKSQUASHFS_ARGS=${CNNBENCH_MKSQUASHFS_ARGS:-}
LOCAL_WHEELS=0 TF_CPU=0 TORCH_CUDA="" FORCE=0 NOTEST=0 IMAGES=()

log() { echo "build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --local-wheels) LOCAL_WHEELS=1 ;;
        --tf-cpu) TF_CPU=1 ;;
        --torch-cuda) [ $# -gt 1 ] || die "--torch-cuda needs a variant (cu126, cu128, cu130, cpu, pypi)"
                      TORCH_CUDA=$2; shift ;;
        --ci) LOCAL_WHEELS=1 TF_CPU=1 MKSQUASHFS_ARGS=${CNNBENCH_MKSQUASHFS_ARGS:--comp zstd -Xcompression-level 3} ;;
        --force) FORCE=1 ;;
        --notest) NOTEST=1 ;;
        torch | tensorflow) IMAGES+=("$1") ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see $0 --help)" ;;
    esac
    shift
done
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=(torch tensorflow)

command -v apptainer >/dev/null ||
    die "apptainer is not on PATH: install it with containers/install-apptainer.sh (as root)"

# --- build arguments -----------------------------------------------------------------------------
binds=() bind_points="" pip_options="--progress-bar off"
if [ "$LOCAL_WHEELS" = 1 ]; then
    for d in $WHEEL_DIRS; do
        [ -d "$d" ] || die "--local-wheels: $d does not exist (set CNNBENCH_WHEEL_DIRS)"
        binds+=(--bind "$d:$d:ro") bind_points+=" $d" pip_options+=" --find-links $d"
    done
    for d in $PIP_INDEXES; do
        [ -d "$d/simple" ] || die "--local-wheels: $d/simple does not exist (set CNNBENCH_PIP_INDEXES)"
        binds+=(--bind "$d:$d:ro") bind_points+=" $d" pip_options+=" --extra-index-url file://$d/simple"
    done
fi
# A TLS-intercepting proxy (as on this project's CI machines) needs the host's CA bundle for pip:
# it is bound into the build at /opt/build-ca (not stored in the image).
ca=${CNNBENCH_PIP_CERT:-${PIP_CERT:-${REQUESTS_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}}}
if [ -f "$ca" ]; then
    mkdir -p "$BUILD_DIR/ca"
    cp "$ca" "$BUILD_DIR/ca/ca.crt"
    binds+=(--bind "$BUILD_DIR/ca:/opt/build-ca:ro") bind_points+=" /opt/build-ca"
    pip_options+=" --cert /opt/build-ca/ca.crt"
fi
# The build's pip reads only the options above, not this shell's PIP_* settings.
for v in $(compgen -e | grep '^PIP_' || true); do unset "$v"; done

build_args() {  # the --build-arg-file content of one image: NAME=VALUE lines
    echo "PIP_OPTIONS=$pip_options"
    echo "BUILD_BINDS=${bind_points# }"
    if [ "$1" = torch ] && [ -n "$TORCH_CUDA" ]; then  # absent: the definition's default (same hash as before)
        echo "TORCH_CUDA=$TORCH_CUDA"
    fi
    if [ "$1" = tensorflow ] && [ "$TF_CPU" = 1 ]; then
        echo "TF_REQUIREMENTS=tensorflow-cpu==2.21.0 keras==3.15.1"
        echo "TF_VARIANT=cpu"
    fi
}

as_builder() {  # run a command as the unprivileged build user (as ourselves if not root)
    if [ "$(id -u)" = 0 ]; then
        id "$BUILD_USER" >/dev/null 2>&1 ||
            die "no build user $BUILD_USER: run containers/install-apptainer.sh (it creates one)"
        grep -q "^$BUILD_USER:" /etc/subuid && grep -q "^$BUILD_USER:" /etc/subgid ||
            die "$BUILD_USER has no /etc/subuid or /etc/subgid range (needed by --fakeroot)"
        # --fakeroot mounts the user's home; it lives under /var/tmp, which a reboot may have emptied
        home=$(getent passwd "$BUILD_USER" | cut -d: -f6)
        [ -d "$home" ] || install -d -o "$BUILD_USER" -g "$(id -gn "$BUILD_USER")" "$home"
        runuser -u "$BUILD_USER" -- env HOME="$BUILD_DIR/home" PATH="$PATH:/usr/sbin:/sbin" "$@"
    else
        env HOME="$BUILD_DIR/home" "$@"
    fi
}

mkdir -p "$BUILD_DIR/home" "$BUILD_DIR/cache" "$BUILD_DIR/tmp" "$BUILD_DIR/out" "$BUILD_DIR/images"
[ "$(id -u)" = 0 ] && chown -R "$BUILD_USER:" "$BUILD_DIR"
chmod 755 "$BUILD_DIR"

for name in "${IMAGES[@]}"; do
    def="$HERE/$name.def"
    [ -f "$def" ] || die "no definition file $def"
    args=$(build_args "$name")
    hash=$( { cat "$def"; echo "--- build args"; echo "$args"; echo "--- mksquashfs: $MKSQUASHFS_ARGS"; } |
        sha256sum | cut -c1-16)
    sif="$HERE/$name-$hash.sif"
    cached="$BUILD_DIR/images/$name-$hash.sif"  # survives a fresh clone (CI)
    if [ "$FORCE" = 0 ] && [ -f "$sif" ]; then
        log "$name: reusing $(basename "$sif") (same definition and build arguments)"
    elif [ "$FORCE" = 0 ] && [ -f "$cached" ]; then
        ln -f "$cached" "$sif" 2>/dev/null || cp "$cached" "$sif"
        log "$name: reusing $cached (same definition and build arguments)"
    else
        log "$name: building $(basename "$sif") (build args: $(echo "$args" | tr '\n' ';'))"
        work="$BUILD_DIR/out/$name-$hash"
        rm -rf "$work"; mkdir -p "$work"
        cp "$def" "$work/$name.def"
        printf '%s\n' "$args" >"$work/build-args"
        [ "$(id -u)" = 0 ] && chown -R "$BUILD_USER:" "$work"
        start=$(date +%s)
        extra=()
        [ "$NOTEST" = 1 ] && extra+=(--notest)
        [ -n "$MKSQUASHFS_ARGS" ] && extra+=(--mksquashfs-args "$MKSQUASHFS_ARGS")
        as_builder env APPTAINER_CACHEDIR="$BUILD_DIR/cache" APPTAINER_TMPDIR="$BUILD_DIR/tmp" \
            apptainer build --fakeroot --force "${extra[@]}" "${binds[@]}" \
            --build-arg-file "$work/build-args" "$work/$name.sif" "$work/$name.def" \
            2>&1 | tee "$work/build.log" >&2 ||
            die "$name: apptainer build failed; log: $work/build.log"
        mv -f "$work/$name.sif" "$cached"
        ln -f "$cached" "$sif" 2>/dev/null || cp "$cached" "$sif"
        log "$name: built $(basename "$sif") ($(du -h "$sif" | cut -f1)) in $(( $(date +%s) - start )) s"
        # Images are GBs: keep only the newest build of each name, and no build leftovers.
        for old in "$BUILD_DIR/images/$name"-*.sif "$HERE/$name"-*.sif; do
            [ -e "$old" ] && [ "$(basename "$old")" != "$name-$hash.sif" ] && rm -f "$old" && log "removed the older $old"
        done
        rm -rf "${BUILD_DIR:?}/tmp/"* "$work"
    fi
    ln -sfn "$(basename "$sif")" "$HERE/$name.sif"
done
