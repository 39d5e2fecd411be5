#!/usr/bin/env bash
# Build a minimal Debian bookworm base image (python3 + venv) from Debian's own mirror, for builders that cannot
# pull public images (air-gapped, or this project's dev/CI machines). The step images then build on it with
#   --build-arg BASE_IMAGE=localhost/vlmtune-base:bookworm
#
# Usage (as root):  docker/build_local_base.sh [--engine podman|docker] [--tag NAME] [--cache-dir DIR] [--mirror URL]
#
# The rootfs tarball is cached (default /var/cache/vlmtune/rootfs-bookworm.tar): a rerun with the tarball present
# skips debootstrap and only imports it (seconds), or does nothing when the image exists already. Delete the
# tarball and the image to rebuild from the mirror (~1.5 min on 2 cores).
set -euo pipefail

ENGINE="${ENGINE:-}"
TAG="localhost/vlmtune-base:bookworm"
CACHE_DIR="${VLMTUNE_CACHE_DIR:-/var/cache/vlmtune}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="bookworm"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --engine) ENGINE="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --cache-dir) CACHE_DIR="$2"; shift 2 ;;
    --mirror) MIRROR="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build_local_base.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "${ENGINE}" ]]; then
  if command -v podman >/dev/null 2>&1; then ENGINE=podman
  elif command -v docker >/dev/null 2>&1; then ENGINE=docker
  else echo "build_local_base.sh: neither podman nor docker found; install one or pass --engine" >&2; exit 1
  fi
fi

TARBALL="${CACHE_DIR}/rootfs-${SUITE}.tar"
if [[ -s "${TARBALL}" ]] && "${ENGINE}" image inspect "${TAG}" >/dev/null 2>&1; then
  # Already imported from the cached tarball: importing again would make a new image id and so invalidate
  # the build cache of every image built on it.
  echo "${TAG}"
  exit 0
fi
if [[ ! -s "${TARBALL}" ]]; then
  command -v debootstrap >/dev/null 2>&1 || { echo "build_local_base.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
  [[ "$(id -u)" == 0 ]] || { echo "build_local_base.sh: debootstrap needs root" >&2; exit 1; }
  mkdir -p "${CACHE_DIR}"
  ROOTFS="$(mktemp -d "${CACHE_DIR}/rootfs.XXXXXX")"
  trap 'rm -rf "${ROOTFS}"' EXIT
  # minbase + python3/python3-venv is what the step images need (they create /opt/venv and pip-install into it);
  # ca-certificates so pip can reach an HTTPS index during the image build.
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "${SUITE}" "${ROOTFS}" "${MIRROR}"
  # Drop what a runtime never reads: apt lists and .debs, docs, man pages, locales other than C.
  rm -rf "${ROOTFS}"/var/lib/apt/lists/* "${ROOTFS}"/var/cache/apt/*.bin "${ROOTFS}"/var/cache/apt/archives/*.deb \
         "${ROOTFS}"/usr/share/doc/* "${ROOTFS}"/usr/share/man/* "${ROOTFS}"/usr/share/info/* \
         "${ROOTFS}"/usr/share/locale/*
  # Write to a temporary name first so an interrupted run never leaves a truncated tarball that looks cached.
  tar --numeric-owner -C "${ROOTFS}" -cf "${TARBALL}.partial" .
  mv "${TARBALL}.partial" "${TARBALL}"
fi

"${ENGINE}" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  "${TARBALL}" "${TAG}" >/dev/null
echo "${TAG}"
