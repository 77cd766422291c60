#!/usr/bin/env bash
# Make a machine able to run the container tests: a Docker engine, `docker compose`, and the
# python:3.11-slim base image. Idempotent: every step is skipped when its result is already there.
#
# On a machine that cannot reach a container registry, the base image is a local stand-in built
# with debootstrap (Debian bookworm's Python 3.11). Its tarball is cached outside the clone, in
# ${XDG_CACHE_HOME:-~/.cache}/cnn-serve, because building it takes over a minute.
#
# If this script starts dockerd, it writes its PID to $CNN_SERVE_STATE/dockerd.pid so the caller
# can stop it (see .ci/run).
set -euo pipefail

BASE_IMAGE=python:3.11-slim
STATE=${CNN_SERVE_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnn-serve}
mkdir -p "$STATE"

log() { printf '[docker-setup] %s\n' "$*" >&2; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io containerd runc)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        log "need root to install packages: ${missing[*]}"; exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_engine() {
    if docker info >/dev/null 2>&1; then return; fi
    log "starting dockerd (log: $STATE/dockerd.log)"
    # No systemd on build machines: run the daemon ourselves, detached from this shell.
    nohup dockerd >"$STATE/dockerd.log" 2>&1 &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        sleep 1
    done
    log "dockerd did not answer within 60 s"; tail -20 "$STATE/dockerd.log" >&2; exit 1
}

install_compose_plugin() {
    # Debian ships Compose v1 as `docker-compose`; this plugin shim makes `docker compose ...`
    # (the v2 spelling users type) run it too.
    if docker compose version >/dev/null 2>&1; then return; fi
    local dir=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
    mkdir -p "$dir"
    cat >"$dir/docker-compose" <<'SHIM'
#!/bin/sh
if [ "$1" = docker-cli-plugin-metadata ]; then
    echo '{"SchemaVersion":"0.1.0","Vendor":"Docker Compose v1 shim","Version":"1.29.2","ShortDescription":"Docker Compose (v1)"}'
    exit 0
fi
shift  # the CLI passes the plugin name ("compose") first
exec /usr/bin/docker-compose "$@"
SHIM
    chmod +x "$dir/docker-compose"
    log "installed the compose plugin shim in $dir"
}

debian_mirror() {
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1)
    echo "${uri:-http://deb.debian.org/debian}"
}

make_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
    if timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
    # The proxy CA certificates go into the image, or pip inside the build cannot reach PyPI;
    # the tarball's name carries their hash so new certificates mean a new tarball.
    local certs=/usr/local/share/ca-certificates key tarball
    key=$(cat "$certs"/*.crt 2>/dev/null | sha256sum | cut -c1-12)
    tarball="$STATE/python-3.11-slim-standin-$key.tar"
    if [ ! -s "$tarball" ]; then
        log "no registry: building a $BASE_IMAGE stand-in with debootstrap (about 90 s)"
        local rootfs
        rootfs=$(mktemp -d "$STATE/rootfs.XXXXXX")
        debootstrap --variant=minbase \
            --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
            bookworm "$rootfs" "$(debian_mirror)" >"$STATE/debootstrap.log" 2>&1
        rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
        if ls "$certs"/*.crt >/dev/null 2>&1; then
            cp "$certs"/*.crt "$rootfs/usr/local/share/ca-certificates/"
            chroot "$rootfs" update-ca-certificates >/dev/null
        fi
        chroot "$rootfs" apt-get clean
        rm -rf "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        rm -rf "$rootfs"
    fi
    log "importing $tarball as $BASE_IMAGE"
    docker import \
        --change 'CMD ["python3"]' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$tarball" "$BASE_IMAGE" >/dev/null
}

install_packages
start_engine
install_compose_plugin
make_base_image
log "ready: $(docker version --format 'engine {{.Server.Version}}'), $(docker compose version --short 2>/dev/null || docker-compose version --short), $BASE_IMAGE present"
