"""`enclave sync -d DIR`: the enclave's share as a folder on the host (FUSE), as in the original sample.

enclave sync -d synced_folder               # mount in the background, return once it works
cp app.pkg synced_folder/encrypted/
enclave sync -d synced_folder --unmount     # unmount and stop the mount's process
"""

import argparse
import contextlib
import json
import sys
from importlib import import_module
from pathlib import Path

from ..plugins.module_utils.errors import EnclaveError
from . import local as local_cmd

LIB = "ansible_collections.confidential_ml.nitro.plugins.module_utils"


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def cmd_sync(args) -> int:
    mounts = import_module(f"{LIB}.mounts")
    folder = Path(args.dir).expanduser()
    if args.unmount:
        # Like every stop command: nothing mounted is not a failure (a second --unmount, or after `local down`).
        mounted = mounts.is_mounted(folder)
        if mounted:
            mounts.unmount(folder, lazy=args.lazy)
        else:
            with contextlib.suppress(EnclaveError):  # "nothing is mounted", once it drops a dead mount's state
                mounts.unmount(folder)
        if args.json:
            _print_json({"mountpoint": str(folder.resolve()), "unmounted": mounted})
        elif mounted:
            print(f"unmounted the enclave share from {folder}")
        else:
            print(f"nothing was mounted at {folder}: nothing to unmount")
        return 0
    runtime = import_module(f"{LIB}.runtime")
    expected = import_module(f"{LIB}.client").expected_pcr0(args.expect_pcr0, args.release, args.no_attestation)
    if expected is not None and len(expected) != 1:
        raise EnclaveError(f"a mount checks one PCR0, {len(expected)} were given")
    expect_pcr0 = expected[0] if expected else None
    endpoint = runtime.resolve_endpoint(args.endpoint, cid=args.cid, port=args.port, local_runtime=local_cmd.runtime)
    if not folder.exists():
        folder.mkdir(parents=True)
    fusefs = import_module(".fusefs", __package__)
    if not args.foreground:
        fusefs.mount(endpoint, folder, expect_pcr0=expect_pcr0, allow_debug=args.allow_debug)
        state = mounts.mount_state(folder) or {}
        if args.json:
            _print_json(state)
            return 0
        print(
            f"mounted the enclave share ({endpoint}) on {folder} (process {state.get('pid')}, log {state.get('log')})\n"
            f"unmount with: enclave sync -d {folder} --unmount"
        )
        return 0
    print(f"serving the enclave share ({endpoint}) on {folder}; Ctrl-C or `enclave sync -d {folder} --unmount` ends it",
          file=sys.stderr, flush=True)  # fmt: skip
    fusefs.mount(endpoint, folder, foreground=True, expect_pcr0=expect_pcr0, allow_debug=args.allow_debug)
    return 0


def add_parser(commands, add_enclave_flags, make_client) -> None:
    """Register `enclave sync`. The mount opens and attests its own long-lived connection, so make_client,
    which builds a short-lived one, is not used."""
    sync = commands.add_parser(
        "sync",
        help="mount the enclave's share on a local folder (FUSE)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sync.add_argument("-d", "--dir", required=True, help="folder to mount the share on (created if missing)")
    sync.add_argument("--unmount", action="store_true", help="unmount the folder and stop its mount process")
    sync.add_argument("--lazy", action="store_true", help="with --unmount: detach now even if the folder is in use")
    sync.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    sync.add_argument(
        "--json", action="store_true", help="print the mount's state (mountpoint, endpoint, pid, log) as JSON"
    )
    add_enclave_flags(sync)
    sync.set_defaults(func=cmd_sync)
