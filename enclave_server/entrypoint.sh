#!/bin/sh
# The enclave image's entrypoint: give the share and the private work
# directory a tmpfs each, then become the enclave server.
#
# The enclave's root file system is memory already; separate mounts cap the
# share (the host fills it) and keep decrypted packages (under --work) off the
# share's file system, so neither can starve the other. The mount points are
# read from the server's own --share and --work arguments (the image's CMD),
# so they are written once. Sizes are tmpfs size= values (a percentage of the
# enclave's memory, or k/m/g): ENCLAVE_SHARE_SIZE (default 50%) and
# ENCLAVE_WORK_SIZE (default 25%).
set -eu

share=""
work=""
previous=""
for arg in "$@"; do
    case "$previous" in
        --share) share=$arg ;;
        --work) work=$arg ;;
    esac
    case "$arg" in
        --share=*) share=${arg#--share=} ;;
        --work=*) work=${arg#--work=} ;;
    esac
    previous=$arg
done

mount_tmpfs() { # DIRECTORY SIZE
    mkdir -p "$1"
    # Already a tmpfs (a restarted server): keep it and what the host put there.
    if ! grep -qs "^[^ ]* $1 tmpfs " /proc/mounts; then
        mount -t tmpfs -o "size=$2,mode=0700,nosuid,nodev" tmpfs "$1"
    fi
}

if [ -n "$share" ]; then
    mount_tmpfs "$share" "${ENCLAVE_SHARE_SIZE:-50%}"
fi
if [ -n "$work" ]; then
    mount_tmpfs "$work" "${ENCLAVE_WORK_SIZE:-25%}"
fi

exec python3 -m ansible_collections.confidential_ml.nitro.enclave_server "$@"
