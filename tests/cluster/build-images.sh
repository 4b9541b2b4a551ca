#!/usr/bin/env bash
# Builds radfm's container images without Docker or a registry: OCI image archives of
#   radfm-operator  (operator/Dockerfile: /usr/local/bin/radfm-operator, user 65532, CMD run)
#   radfm-trainer   (trainer/Dockerfile, CPU: /usr/local/bin/radfm-trainer and radfm, libtorch in
#                    /opt/libtorch/lib, user 10001 with /home/radfm)
#   pause           (the pod sandbox: Debian's static catatonit in pause mode)
# from binaries already built, holding only the shared libraries they load (ldd), assembled with
# umoci (Debian package). Each archive loads with `ctr images import`, `kind load image-archive`,
# `docker load` and `podman load`.
#
#   build-images.sh BIN_DIR OUT_DIR [TAG]
#
# Idempotent: an archive is rebuilt only when its binaries or this script change (a hash of them
# names the archive's stamp). Prints OUT_DIR on its last line.
set -euo pipefail
bin=$(cd "$1" && pwd)
mkdir -p "$2"
out=$(cd "$2" && pwd)
tag=${3:-dev}
# One builder at a time per output folder (tests in several processes may ask at once).
exec 9>"$out/.lock"
flock 9
command -v umoci >/dev/null || { apt-get update -qq && apt-get install -y -qq umoci; }
command -v catatonit >/dev/null || { apt-get update -qq && apt-get install -y -qq catatonit; }
[ -f /etc/ssl/certs/ca-certificates.crt ] || { apt-get update -qq && apt-get install -y -qq ca-certificates; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Copies the ELF files given and every library they load into rootfs $1, at the same paths, and
# strips debug info (debug builds carry hundreds of MB of it).
add_elf() {
  local root=$1; shift
  for f in "$@"; do
    ldd "$f" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
      [ -e "$root$lib" ] && continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
}

# The system CA bundle, as the production base images carry it: the object-store clients refuse
# to start without trust roots, even for plain-HTTP endpoints.
ca_bundle() { # root
  mkdir -p "$1/etc/ssl/certs"
  cp -L /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"
}

# The accounts of a distroless/Debian image: root, nobody and the image's user.
accounts() { # root uid name home
  mkdir -p "$1/etc" "$1/tmp" "$1$4"
  chmod 1777 "$1/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\n%s:x:%s:%s::%s:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' "$3" "$2" "$2" "$4" >"$1/etc/passwd"
  printf 'root:x:0:\n%s:x:%s:\nnogroup:x:65534:\n' "$3" "$2" >"$1/etc/group"
  chown "$2:$2" "$1$4"
}

# Packs rootfs $2 as image $1:$tag with the given umoci config flags, into $out/$1.tar.
pack() {
  local name=$1 root=$2; shift 2
  local layout="$work/$name-layout"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci unpack --image "$layout:$tag" "$work/$name-bundle" >/dev/null
  cp -a "$root/." "$work/$name-bundle/rootfs/"
  umoci repack --image "$layout:$tag" "$work/$name-bundle"
  umoci config --image "$layout:$tag" --author radfm --os linux --architecture amd64 "$@"
  umoci gc --layout "$layout"
  # The reference name containerd, Docker and podman give the image on import.
  python3 - "$layout/index.json" "docker.io/radfm/$name:$tag" <<'EOF'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = ref
json.dump(index, open(path, "w"))
EOF
  tar -C "$layout" -cf "$out/$name.tar.tmp" .
  mv "$out/$name.tar.tmp" "$out/$name.tar"
}

# The PATH Debian-based images carry (the production bases set it).
image_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

stamp_of() { cat "$@" "$0" | sha256sum | cut -c1-16; }

build_operator() {
  local root="$work/operator-root"
  mkdir -p "$root/usr/local/bin"
  install -m 0755 "$bin/radfm-operator" "$root/usr/local/bin/"
  strip --strip-debug "$root/usr/local/bin/radfm-operator"
  add_elf "$root" "$bin/radfm-operator"
  ca_bundle "$root"
  accounts "$root" 65532 nonroot /home/nonroot
  pack radfm-operator "$root" --config.user 65532:65532 --config.env "PATH=$image_path" \
    --config.entrypoint /usr/local/bin/radfm-operator --config.cmd run
}

build_trainer() {
  local root="$work/trainer-root"
  mkdir -p "$root/usr/local/bin" "$root/opt/libtorch/lib" "$root/etc/ld.so.conf.d"
  install -m 0755 "$bin/radfm-trainer" "$bin/radfm" "$root/usr/local/bin/"
  strip --strip-debug "$root/usr/local/bin/radfm-trainer" "$root/usr/local/bin/radfm"
  # libtorch's libraries go where the production image keeps them, the system's where they are.
  local torch_lib
  torch_lib=$(cd "$(dirname "$0")/../.." && readlink -f .libtorch)/lib
  for f in "$bin/radfm-trainer" "$bin/radfm"; do
    LD_LIBRARY_PATH="$torch_lib" ldd "$f" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
      case "$lib" in
        "$torch_lib"/*) cp -L "$lib" "$root/opt/libtorch/lib/" ;;
        *) [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"; } ;;
      esac
    done
  done
  echo /opt/libtorch/lib >"$root/etc/ld.so.conf.d/libtorch.conf"
  printf 'include /etc/ld.so.conf.d/*.conf\n' >"$root/etc/ld.so.conf"
  ldconfig -r "$root"
  ca_bundle "$root"
  accounts "$root" 10001 radfm /home/radfm
  pack radfm-trainer "$root" --config.user 10001 --config.env HOME=/home/radfm \
    --config.env "PATH=$image_path" \
    --config.entrypoint /usr/local/bin/radfm-trainer
}

build_pause() {
  local root="$work/pause-root"
  mkdir -p "$root"
  install -m 0755 "$(command -v catatonit)" "$root/pause"
  pack pause "$root" --config.user 65535 --config.entrypoint /pause --config.cmd=-P
}

want() { # name stamp-inputs...
  local name=$1; shift
  local stamp
  stamp=$(stamp_of "$@")
  if [ -f "$out/$name.tar" ] && [ "$(cat "$out/$name.stamp" 2>/dev/null)" = "$stamp" ]; then
    return 1
  fi
  echo "images: building $name" >&2
  rm -f "$out/$name.stamp"
  echo "$stamp" >"$work/$name.stamp"
}

start=$(date +%s)
if want radfm-operator "$bin/radfm-operator"; then build_operator; mv "$work/radfm-operator.stamp" "$out/"; fi
if want radfm-trainer "$bin/radfm-trainer" "$bin/radfm"; then build_trainer; mv "$work/radfm-trainer.stamp" "$out/"; fi
if want pause "$(command -v catatonit)"; then build_pause; mv "$work/pause.stamp" "$out/"; fi
echo "images: ready in $(($(date +%s) - start))s" >&2
echo "$out"
