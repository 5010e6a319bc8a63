"""`enclave share ls|rm`: look into the enclave's share and delete from it, over the share's own operations.

enclave share ls [PATH]            what a folder of the share holds (default: its top-level folders)
enclave share rm [-r] [-f] PATH... delete files (and with -r folders) from the share, as rm does

The share's top-level folders (/dataset, /encrypted, /model, /output) are its layout and stay; while a job runs
the enclave refuses changes to /dataset, /model and /output and to the package the job runs.
"""

import errno
import json
import stat
import sys
import time

from ..plugins.module_utils.errors import EnclaveError, RemoteError

LIB = "ansible_collections.confidential_ml.nitro.plugins.module_utils"


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _share_path(path: str) -> str:
    return "/" + "/".join(p for p in path.split("/") if p)


def _missing(client, path: str, what: str) -> EnclaveError:
    # The client's own description of what the nearest folder holds, as push, pull and run give it.
    return EnclaveError(f"there is no {path} in the enclave's share ({client._what_is_there(path)}): {what}")


def _attesting(args) -> bool:
    return bool(args.expect_pcr0 or args.release)  # ls and rm send no data: attest only when asked to


def cmd_ls(args, make_client) -> int:
    path = _share_path(args.path)
    with make_client(args, attest_first=_attesting(args)) as client:
        st = client.stat(path)
        if st is None:
            raise _missing(client, path, "list a folder that is there, e.g. `enclave share ls /dataset`")
        if stat.S_ISDIR(st["mode"]):
            entries = sorted(client.call("share.list", {"path": path}), key=lambda e: e["name"])
        else:
            entries = [dict(st, name=path.rsplit("/", 1)[1])]
    if args.json:
        kinds = ["dir" if stat.S_ISDIR(e["mode"]) else "file" for e in entries]
        shown = [dict(e, type=kind, mode=stat.S_IMODE(e["mode"])) for e, kind in zip(entries, kinds, strict=True)]
        _print_json({"path": path, "entries": shown})
        return 0
    for e in entries:
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["mtime_ns"] / 1e9))
        folder = "/" if stat.S_ISDIR(e["mode"]) else ""
        print(f"{stat.filemode(e['mode'])} {e['size']:>14} {modified} {e['name']}{folder}")
    if not entries:
        print(f"{path} is empty", file=sys.stderr)
    return 0


def _refuse_layout(client, path: str) -> None:
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise EnclaveError("the share's root cannot be removed: name files or folders inside its folders")
    top = client._top_level()
    if len(parts) == 1 and parts[0] in top:
        inside = sorted(e["name"] for e in client.call("share.list", {"path": path}))
        example = " ".join(f"{path}/{name}" for name in inside[:3]) if inside else f"{path}/NAME"
        raise EnclaveError(
            f"{path} is one of the share's folders ({', '.join('/' + t for t in top)}), which stay: to empty it, "
            f"remove what it holds ({len(inside)} entries), e.g. `enclave share rm -r {example}`"
        )


def _remove(client, path: str, st: dict, counts: dict) -> None:
    """Remove path, a folder with all it holds (deepest first), counting what went. A stack, not recursion: a
    share path may be 4096 bytes, about 2000 folders deep."""
    stack = [(path, st, False)]
    while stack:
        current, entry, listed = stack.pop()
        if not stat.S_ISDIR(entry["mode"]):
            client.call("share.unlink", {"path": current})
            counts["files"] += 1
            counts["bytes"] += entry.get("size", 0)
        elif listed:  # everything it held is gone
            client.call("share.rmdir", {"path": current})
            counts["folders"] += 1
        else:
            stack.append((current, entry, True))
            stack.extend((f"{current}/{e['name']}", e, False) for e in client.call("share.list", {"path": current}))


def cmd_rm(args, make_client) -> int:
    paths = [_share_path(p) for p in args.paths]
    counts = {"files": 0, "folders": 0, "bytes": 0}
    removed: list[str] = []
    with make_client(args, attest_first=_attesting(args)) as client:
        targets = []
        for path in paths:  # every path is checked before anything is removed: a typo removes nothing
            _refuse_layout(client, path)
            st = client.stat(path)
            if st is None:
                if args.force:
                    continue
                raise _missing(client, path, "nothing was removed; name what is there (-f ignores missing paths)")
            if stat.S_ISDIR(st["mode"]) and not args.recursive:
                raise EnclaveError(
                    f"{path} is a folder: nothing was removed; `enclave share rm -r {path}` removes it and all it holds"
                )
            targets.append((path, st))
        for path, st in targets:
            try:
                _remove(client, path, st, counts)
            except RemoteError as err:
                if err.errno != errno.EBUSY:
                    raise
                done = f" ({', '.join(removed)} removed before)" if removed else ""
                raise EnclaveError(
                    f"{path} was not removed{done}: {err.strerror} (with `enclave job cancel`)"
                ) from None
            removed.append(path)
    if args.json:
        _print_json({"removed": removed, **counts})
    else:
        for path in removed:
            print(f"removed {path}")
        print(f"{counts['files']} files ({counts['bytes']} bytes) and {counts['folders']} folders removed")
    return 0


def register(commands, add_enclave_flags, make_client) -> None:
    share = commands.add_parser("share", help="list and delete what is in the enclave's share")
    share_cmds = share.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    ls = share_cmds.add_parser("ls", help="list a folder of the share (default: its top-level folders)")
    ls.add_argument("path", nargs="?", default="/", help="a folder or file in the share, e.g. /dataset (default /)")
    ls.add_argument("--json", action="store_true", help="print one JSON document (modes, sizes, times)")
    add_enclave_flags(ls, attest=False)
    ls.set_defaults(func=lambda args: cmd_ls(args, make_client))
    rm = share_cmds.add_parser("rm", help="delete files, or folders with -r, from the share (not its top folders)")
    rm.add_argument("paths", nargs="+", metavar="PATH", help="what to delete, e.g. /dataset/old.csv")
    rm.add_argument("-r", "--recursive", action="store_true", help="delete folders and everything they hold")
    rm.add_argument("-f", "--force", action="store_true", help="ignore paths that do not exist")
    rm.add_argument("--json", action="store_true", help="print one JSON document")
    add_enclave_flags(rm, attest=False)
    rm.set_defaults(func=lambda args: cmd_rm(args, make_client))
