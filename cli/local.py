"""`enclave local ...`: the local backend, with nitro-cli's commands, options and JSON.

    enclave local up [--kms-port P]          start the local cloud (KMS), idempotent
    enclave local down                       unmount their shares, stop every local enclave and the local cloud
    enclave local env [--profile NAME]       the exports that point boto3, the AWS CLI and `enclave` at the
                                             running local cloud: eval "$(enclave local env)"
    enclave local build [--output FILE] [--owner-key KEY ... | --owner-identity FILE]
                                             build-enclave: a reproducible image and its PCRs, bound to
                                             the owner's package-signing keys
    enclave local run-enclave --eif-path FILE --cpu-count N --memory MIB [--enclave-cid C]
                              [--enclave-name NAME] [--debug-mode]
    enclave local describe-enclaves
    enclave local terminate-enclave (--enclave-id ID | --all)
    enclave local console --enclave-id ID    debug-mode enclaves only

Imports are deferred to the command that runs, so `enclave --help` stays fast.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from . import options

LOCAL = "ansible_collections.confidential_ml.nitro.enclave_local"


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def runtime():
    """The local runtime, in this process (imported on first use)."""
    from importlib import import_module

    return import_module(f"{LOCAL}.runtime").LocalRuntime()


def cmd_up(args) -> int:
    from importlib import import_module

    cloud = import_module(f"{LOCAL}.cloud").up(args.kms_port)
    if args.json:
        _print_json(cloud)
    else:
        verb = "started" if cloud["started"] else "already running"
        print(f"local cloud {verb}: KMS at {cloud['kms_endpoint_url']} (keys in {cloud['kms_state']})")
        print(f"attestation root: {cloud['ca_root']}; vsock-proxy allowlist: {cloud['vsock_proxy_config']}")
        print(f"credentials: AWS_SHARED_CREDENTIALS_FILE={cloud.get('kms_credentials')} AWS_PROFILE=owner|enclave-host")
    return 0


def cmd_down(args) -> int:
    from importlib import import_module

    stopped = import_module(f"{LOCAL}.cloud").down()
    if args.json:
        _print_json(stopped)
    else:
        for folder in stopped["unmounted"]:
            print(f"unmounted the enclave share from {folder}")
        for enclave_id in stopped["enclaves"]:
            print(f"terminated local enclave {enclave_id}")
        print(f"stopped the local KMS at {stopped['kms']}" if stopped["kms"] else "the local KMS was not running")
    return 0


def cmd_env(args) -> int:
    import shlex
    from importlib import import_module

    exports = import_module(f"{LOCAL}.cloud").env_exports(profile=args.profile)
    print(f'# the local cloud of {dict(exports)["ENCLAVE_HOME"]}: eval "$(enclave local env)" in your shell')
    for name, value in exports:
        print(f"unset {name}" if value is None else f"export {name}={shlex.quote(value)}")
    return 0


def cmd_build(args) -> int:
    from importlib import import_module

    settings = import_module("ansible_collections.confidential_ml.nitro.plugins.module_utils.settings")
    output = args.output or str(settings.state_home() / "images" / "enclave.eif")
    with tempfile.TemporaryDirectory(prefix="owner-identity-") as tmp:
        owner_identity = args.owner_identity
        if args.owner_key:
            identity_lib = import_module(
                "ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity"
            )
            kms = options.kms_client(args)
            identity = identity_lib.OwnerIdentity(
                tuple(identity_lib.owner_key_from_kms(kms, key) for key in args.owner_key)
            )
            owner_identity = os.path.join(tmp, "owner_identity.json")
            Path(owner_identity).write_bytes(identity.dumps())
        result = runtime().build(output=output, source=args.source, owner_identity=owner_identity)
    print(f"built {result.image}", file=sys.stderr)
    if args.owner_key or args.owner_identity:
        print("bound to the owner's signing keys (PCR0 measures them)", file=sys.stderr)
    else:
        print("warning: no --owner-key: this image runs packages from anyone (development only)", file=sys.stderr)
    _print_json({"Measurements": result.measurements.to_json()})
    return 0


def cmd_run_enclave(args) -> int:
    info = runtime().run(
        args.eif_path,
        cpu_count=args.cpu_count,
        memory_mib=args.memory,
        cid=args.enclave_cid,
        name=args.enclave_name,
        debug_mode=args.debug_mode,
    )
    _print_json(info.to_json())
    return 0


def cmd_describe(args) -> int:
    _print_json([info.to_json() for info in runtime().describe()])
    return 0


def cmd_terminate(args) -> int:
    local = runtime()
    if args.all:  # one JSON array (empty when nothing ran), as nitro-cli prints for --all
        _print_json([{"EnclaveID": enclave_id, "Terminated": True} for enclave_id in local.terminate(all=True)])
        return 0
    for enclave_id in local.terminate(args.enclave_id):
        _print_json({"EnclaveID": enclave_id, "Terminated": True})
    return 0


def cmd_console(args) -> int:
    sys.stdout.write(runtime().console(args.enclave_id))
    return 0


def register(commands) -> None:
    """Add `local` and its subcommands to the `enclave` parser's subcommands."""
    local = commands.add_parser("local", help="the local backend: local cloud, images and enclaves (nitro-cli style)")
    sub = local.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

    up = sub.add_parser("up", help="start the local cloud (the local KMS); does nothing if it runs")
    up.add_argument("--kms-port", type=int, default=0, help="KMS port on 127.0.0.1 (default: any free port)")
    up.add_argument("--json", action="store_true", help="print the local cloud's endpoints and files as JSON")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="terminate every local enclave and stop the local cloud")
    down.add_argument("--json", action="store_true", help="print what was stopped as JSON")
    down.set_defaults(func=cmd_down)
    env = sub.add_parser(
        "env",
        help="print the exports that point boto3, the AWS CLI and `enclave` at the running local cloud: "
        'eval "$(enclave local env)"',
    )
    env.add_argument(
        "--profile",
        default="enclave-host",
        help="the party to act as: a profile of the credentials the local KMS issued (owner, enclave-host, admin; "
        "default enclave-host, the user's host, which can never change a key policy)",
    )
    env.set_defaults(func=cmd_env)

    build = sub.add_parser("build", help="build the enclave image reproducibly and print its measurements")
    build.add_argument("--output", help="image file to write (default: $ENCLAVE_HOME/images/enclave.eif)")
    build.add_argument("--source", help="project tree to build from (default: this installation)")
    owner = build.add_mutually_exclusive_group()
    owner.add_argument(
        "--owner-key",
        action="append",
        metavar="KEY",
        help="the owner's KMS package-signing key (ECC_NIST_P384, SIGN_VERIFY); repeat for rotation: the image "
        "runs only packages these keys signed (their public keys are read with GetPublicKey)",
    )
    owner.add_argument("--owner-identity", metavar="FILE", help="the owner's signing keys as an owner_identity.json")
    options.add_kms_flags(build)
    build.set_defaults(func=cmd_build)

    run = sub.add_parser("run-enclave", help="start an enclave from an image")
    run.add_argument("--eif-path", required=True, help="the image (from `enclave local build`)")
    run.add_argument("--cpu-count", type=int, required=True, help="CPUs the enclave may use")
    run.add_argument("--memory", type=int, required=True, help="memory in MiB (share 60%%, decrypted packages 30%%)")
    run.add_argument("--enclave-cid", type=int, help="the enclave's CID (default: the first free from 16)")
    run.add_argument("--enclave-name", help="a name (default: the image file's name)")
    run.add_argument("--debug-mode", action="store_true", help="keep a console; attests all-zero PCRs")
    run.set_defaults(func=cmd_run_enclave)

    describe = sub.add_parser("describe-enclaves", help="list the running local enclaves")
    describe.set_defaults(func=cmd_describe)

    terminate = sub.add_parser("terminate-enclave", help="stop an enclave and remove everything it had")
    which = terminate.add_mutually_exclusive_group(required=True)
    which.add_argument("--enclave-id", help="the enclave's ID (or name)")
    which.add_argument("--all", action="store_true", help="every local enclave")
    terminate.set_defaults(func=cmd_terminate)

    console = sub.add_parser("console", help="print a debug-mode enclave's log")
    console.add_argument("--enclave-id", required=True, help="the enclave's ID (or name)")
    # nitro-cli's option, accepted so both backends are driven alike; the local log is printed, not followed.
    console.add_argument("--disconnect-timeout", type=int, help=argparse.SUPPRESS)
    console.set_defaults(func=cmd_console)
