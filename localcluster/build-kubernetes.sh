#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2 from Debian's
# `kubernetes` source package into a cache outside the repository, once. Later runs return at once.
# Also installs the runtime dependencies of the local control plane (etcd-server).
set -euo pipefail

VERSION=1.20.2
CACHE="${MODELOPS_CACHE:-$HOME/.cache/modelops}"
BIN="$CACHE/kubernetes-$VERSION/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

die() { echo "build-kubernetes: $*" >&2; exit 1; }

have_binaries() {
  for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] && [ -s "$BIN/$b" ] || return 1; done
}

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "packages ${missing[*]} are missing; run this script as root or install them"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# Runtime dependencies of the local cluster and its tests: etcd, and Prometheus for the prometheus provider.
apt_install etcd-server prometheus
if have_binaries; then
  echo "build-kubernetes: using cached binaries in $BIN"
  exit 0
fi

apt_install golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev

SRC_LIST=/etc/apt/sources.list.d/modelops-debian-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  cat > "$SRC_LIST" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq || die "apt-get update (with deb-src) failed"
fi

WORK="$CACHE/src"
mkdir -p "$WORK"
cd "$WORK"
TREE=$(find "$WORK" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -n 1)
if [ -z "$TREE" ]; then
  apt-get source -qq kubernetes >/dev/null || die "apt-get source kubernetes failed (is the deb-src entry reachable?)"
  TREE=$(find "$WORK" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -n 1)
  [ -n "$TREE" ] || die "apt-get source kubernetes gave no kubernetes-1.20* tree in $WORK"
fi

# The vendored reflect2 v1.0.1 crashes kube-apiserver under Go >= 1.18 (SIGSEGV in mapiterinit on
# the first custom resource write); Debian's 1.0.2 copy fixes it.
R2=/usr/share/gocode/src/github.com/modern-go/reflect2
rm -rf "$TREE/vendor/github.com/modern-go/reflect2"
mkdir -p "$TREE/vendor/github.com/modern-go/reflect2"
cp -r "$R2"/. "$TREE/vendor/github.com/modern-go/reflect2/"
find "$TREE/vendor/github.com/modern-go/reflect2" -name '*_test.go' -delete

# GOPATH mode: the 1.20 build scripts expect k8s.io/kubernetes under GOPATH.
mkdir -p "$TREE/.go/src/k8s.io"
ln -sfn "$TREE" "$TREE/.go/src/k8s.io/kubernetes"
# A failed earlier run can leave an empty generator binary behind.
rm -rf "$TREE/_output"
cd "$TREE/.go/src/k8s.io/kubernetes"
export GOPATH="$TREE/.go" GO111MODULE=off CGO_ENABLED=0 GOCACHE="$CACHE/gocache"
echo "build-kubernetes: building ${BINARIES[*]} (about 8 minutes on 2 cores)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$CACHE/build.log" 2>&1 \
  || { tail -n 30 "$CACHE/build.log" >&2; die "make failed; full log in $CACHE/build.log"; }

mkdir -p "$BIN"
for b in "${BINARIES[@]}"; do
  f=$(find "$TREE/_output" -type f -name "$b" -perm -u+x | head -n 1)
  [ -n "$f" ] || die "make finished but $b is missing under $TREE/_output"
  install -m 0755 "$f" "$BIN/$b"
done
have_binaries || die "binaries in $BIN are incomplete"
echo "build-kubernetes: built $BIN"
