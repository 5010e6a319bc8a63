"""`enclave status` and `enclave job ...`: what runs where, and ending the running job from another terminal.

enclave status [--json]          the enclaves this host can see, their running jobs, the share's mounts
enclave job status [--json]      the running job of one enclave
enclave job cancel [--job ID]    end it, as Ctrl-C in its `enclave run` would
"""

import json
import os
import sys
import time
from importlib import import_module

from ..plugins.module_utils.errors import EnclaveError
from . import local as local_cmd

LIB = "ansible_collections.confidential_ml.nitro.plugins.module_utils"
STATUS_TIMEOUT = 5  # seconds to connect and answer: status reports an enclave that does not as unreachable


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _job_line(job: dict | None) -> str:
    if job is None:
        return "no job is running"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(job["started"]))
    return (
        f"job {job['job']}: {job['script']} from {job['package']}, started {started}, running for {job['elapsed']:.0f}s"
    )


def _running_job(endpoint: str) -> dict:
    """{"job": ...} from the enclave at endpoint, or {"error": why} when it cannot be asked."""
    client_lib = import_module(f"{LIB}.client")
    try:
        with client_lib.EnclaveClient(endpoint, timeout=STATUS_TIMEOUT) as client:
            return {"job": client.call("job.status", timeout=STATUS_TIMEOUT)["job"]}
    except (EnclaveError, OSError) as err:
        return {"error": getattr(err, "strerror", None) or str(err)}


def _enclaves(args) -> tuple[str, list[dict], str | None]:
    """(backend, the enclaves with their jobs, why the runtime could not be asked)."""
    settings = import_module(f"{LIB}.settings")
    runtime_lib = import_module(f"{LIB}.runtime")
    backend = settings.backend()
    port = args.port or settings.DEFAULT_SERVER_PORT
    runtime = local_cmd.runtime() if backend == "local" else runtime_lib.NitroRuntime(port=port, timeout=30)
    problem = None
    try:
        enclaves = [info.to_json() for info in runtime.describe()]
    except (EnclaveError, OSError) as err:  # no nitro-cli on this host, say: the rest is still worth showing
        enclaves, problem = [], str(err)
    given = args.endpoint or os.environ.get(settings.ENV_ENDPOINT)
    given = given or (f"vsock://{args.cid}:{port}" if args.cid is not None else None)
    if given and given not in [e["Endpoint"] for e in enclaves]:
        enclaves.append({"Endpoint": given, "EnclaveName": None, "EnclaveCID": args.cid, "State": None})
    for enclave in enclaves:
        if enclave.get("State") in (None, "RUNNING"):
            enclave.update(_running_job(enclave["Endpoint"]))
    return backend, enclaves, problem


def cmd_status(args) -> int:
    backend, enclaves, problem = _enclaves(args)
    mounts = import_module(f"{LIB}.mounts").mounts()
    if args.json:
        _print_json({"backend": backend, "enclaves": enclaves, "mounts": mounts, "runtime_error": problem})
        return 0
    print(f"backend: {backend} (choose with ENCLAVE_BACKEND=local|nitro)")
    if problem:
        print(f"enclaves: cannot list them: {problem}")
    elif not enclaves:
        start = "enclave local run-enclave" if backend == "local" else "nitro-cli run-enclave"
        print(f"enclaves: none running (start one with `{start}`)")
    for enclave in enclaves:
        if enclave.get("EnclaveID"):
            flags = ", debug mode" if enclave.get("Flags") == "DEBUG_MODE" else ""
            print(f"enclave {enclave['EnclaveName']} ({enclave['EnclaveID']}): CID {enclave['EnclaveCID']}, "
                  f"{enclave['NumberOfCPUs']} CPUs, {enclave['MemoryMiB']} MiB, {enclave['State']}{flags}")  # fmt: skip
        else:
            print("enclave given by --endpoint, --cid or ENCLAVE_ENDPOINT:")
        print(f"  endpoint: --endpoint {enclave['Endpoint']}")
        if "error" in enclave:
            print(f"  unreachable: {enclave['error']}")
        elif "job" in enclave:
            print(f"  {_job_line(enclave['job'])}")
    if not mounts:
        print("mounts: none (`enclave sync -d DIR` mounts the share on a folder)")
    for mount in mounts:
        if mount["mounted"] and mount["alive"]:
            how = f"process {mount['pid']}"
        elif mount["mounted"]:
            how = (
                f"its process {mount['pid']} is gone: unmount it with `enclave sync -d {mount['mountpoint']} --unmount`"
            )
        else:
            how = "no longer mounted"
        print(f"mount {mount['mountpoint']}: the share of {mount['endpoint']} ({how})")
    return 0


def _attesting(args) -> bool:
    return bool(args.expect_pcr0 or args.release)  # job control sends no data: attest only when asked to


def cmd_job_status(args, make_client) -> int:
    with make_client(args, attest_first=_attesting(args)) as client:
        job = client.call("job.status")["job"]
    if args.json:
        _print_json({"job": job})
    else:
        print(_job_line(job))
    return 0


def cmd_job_cancel(args, make_client) -> int:
    with make_client(args, attest_first=_attesting(args)) as client:
        job = client.call("job.cancel", {"job": args.job} if args.job else {})["job"]
    if args.json:
        _print_json({"cancelled": job})
    elif job is None:
        print("no job is running: nothing to cancel")
    else:
        print(f"cancelled job {job['job']} ({job['script']} from {job['package']}, after {job['elapsed']:.0f}s); "
              "its `enclave run` ends, and what it wrote so far stays in /output")  # fmt: skip
    return 0


def register(commands, add_enclave_flags, make_client) -> None:
    status = commands.add_parser("status", help="the enclaves this host can see, their running jobs, share mounts")
    status.add_argument("--endpoint", help="also ask the enclave at this endpoint (default: $ENCLAVE_ENDPOINT)")
    status.add_argument("--cid", type=int, help="also ask the enclave with this CID (nitro)")
    status.add_argument("--port", type=int, help="enclave server port (default 5000)")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.set_defaults(func=cmd_status)

    job = commands.add_parser("job", help="see or cancel the job running in an enclave (from any terminal)")
    job_cmds = job.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    show = job_cmds.add_parser("status", help="the running job: package, script, started, elapsed")
    show.add_argument("--json", action="store_true", help="print one JSON document")
    add_enclave_flags(show, attest=False)
    show.set_defaults(func=lambda args: cmd_job_status(args, make_client))
    cancel = job_cmds.add_parser(
        "cancel", help="end the running job as Ctrl-C in its `enclave run` would (exits 0 if none runs)"
    )
    cancel.add_argument(
        "--job", metavar="ID", help="cancel only if this job (from `enclave status`) is the one running"
    )
    cancel.add_argument("--json", action="store_true", help="print one JSON document")
    add_enclave_flags(cancel, attest=False)
    cancel.set_defaults(func=lambda args: cmd_job_cancel(args, make_client))
