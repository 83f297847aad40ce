#!/usr/bin/env bash
# Builds the meshinit runtime image with podman, without a registry: a minimal
# Debian rootfs from Debian's mirror (mmdebstrap), plus the binaries built here.
#
# The image has the layout the Dockerfile's runtime stage has (a test compares
# them): /usr/local/bin/{meshinit,meshproxy}, meshinit-cni -> meshinit, user
# 2102:2102, entrypoint meshproxy. The rootfs holds only what the two binaries
# run: nft, the iptables tools (nft and legacy flavours) and their libraries;
# a shell and coreutils for the CNI DaemonSet's install step; no apt, no
# file capabilities (see the README's "Why no file capabilities").
#
# The rootfs is built once and cached (keyed by its recipe), so later runs take
# seconds: scripts/test.sh relies on that.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<EOF
Usage: sudo scripts/image.sh [--tag NAME] [--no-build] [--bin-dir DIR] [--cache DIR] [--mirror URL]

  --tag NAME     image name (default localhost/meshinit:latest)
  --no-build     use the binaries already built (see --bin-dir)
  --bin-dir DIR  where the binaries are (default target/release)
  --cache DIR    where the rootfs tarball is kept (default target/image-cache)
  --mirror URL   Debian mirror (default http://deb.debian.org/debian)

podman's global options (--root, --runroot, ...) can be given in PODMAN_OPTS.
EOF
}

TAG=localhost/meshinit:latest
BUILD=1
BIN_DIR=target/release
CACHE=target/image-cache
MIRROR=http://deb.debian.org/debian
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG="$2"; shift ;;
    --no-build) BUILD=0 ;;
    --bin-dir) BIN_DIR="$2"; shift ;;
    --cache) CACHE="$2"; shift ;;
    --mirror) MIRROR="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "scripts/image.sh: unknown argument ${1@Q}" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ $# -ne 0 ] || [ -z "$TAG" ] || [ -z "$BIN_DIR" ] || [ -z "$CACHE" ]; then
  usage >&2; exit 2
fi
for tool in podman mmdebstrap tar; do
  command -v "$tool" >/dev/null || { echo "scripts/image.sh: $tool not found (apt-get install podman mmdebstrap)" >&2; exit 1; }
done
read -r -a podman_opts <<<"${PODMAN_OPTS:-}"

if [ "$BUILD" = 1 ]; then
  echo "==> cargo build --release --locked -p meshinit -p meshproxy"
  cargo build --release --locked -p meshinit -p meshproxy
fi
for binary in meshinit meshproxy; do
  [ -x "$BIN_DIR/$binary" ] || { echo "scripts/image.sh: no $BIN_DIR/$binary (build it, or pass --bin-dir)" >&2; exit 1; }
done

# The rootfs recipe. --variant=extract unpacks the packages and their
# dependencies without running maintainer scripts: no Essential set (dpkg, apt,
# perl, login, ...), nothing the binaries do not run. meshinit calls the tools
# by their flavoured names (iptables-nft-restore, nft), so the alternatives
# symlinks that iptables' postinst would make are not needed. dash and
# coreutils are there for deploy/cni-daemonset.yaml, whose install step is a
# shell script (cp, chmod, mv) and whose idle container runs sleep.
SUITE=bookworm
PACKAGES=nftables,iptables,dash,coreutils
recipe="$SUITE $PACKAGES $MIRROR extract v2"
key=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
rootfs="$CACHE/rootfs-$SUITE-$key.tar"
mkdir -p "$CACHE"
if [ ! -s "$rootfs" ]; then
  echo "==> mmdebstrap $SUITE ($PACKAGES) -> $rootfs"
  started=$(date +%s)
  mmdebstrap --quiet --format=tar --variant=extract --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/cache/apt "$1"/var/lib/apt/lists "$1"/var/log/*' \
    --customize-hook='mkdir -p "$1"/run "$1"/proc "$1"/sys "$1"/root && chmod 1777 "$1"/tmp' \
    --customize-hook='[ -e "$1"/bin/sh ] || ln -s dash "$1"/bin/sh' \
    "$SUITE" "$rootfs.part" "$MIRROR"
  mv "$rootfs.part" "$rootfs"
  # Rootfs tarballs of older recipes are never used again.
  find "$CACHE" -maxdepth 1 -name "rootfs-*.tar" ! -name "${rootfs##*/}" -delete
  echo "    rootfs built in $(($(date +%s) - started)) s"
else
  echo "==> rootfs cached: $rootfs"
fi

# The binaries go in as a second tarball appended to a copy of the rootfs.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/layer/usr/local/bin"
cp "$BIN_DIR/meshinit" "$BIN_DIR/meshproxy" "$work/layer/usr/local/bin/"
# The name a conflist's "type" uses; the DaemonSet copies it to /opt/cni/bin.
ln -s meshinit "$work/layer/usr/local/bin/meshinit-cni"
cp "$rootfs" "$work/image.tar"
tar --append -f "$work/image.tar" --owner=0 --group=0 -C "$work/layer" ./usr/local/bin

echo "==> podman import -> $TAG"
podman "${podman_opts[@]}" import --quiet \
  --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'USER 2102:2102' \
  --change 'ENTRYPOINT ["/usr/local/bin/meshproxy"]' \
  --change 'CMD []' \
  "$work/image.tar" "$TAG" >/dev/null
echo "    $TAG: $(podman "${podman_opts[@]}" image inspect --format '{{.Size}}' "$TAG") bytes"
