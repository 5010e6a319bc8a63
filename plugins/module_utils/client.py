"""The host's client of the enclave server: attest, push, pull, run.

The CLI, the Ansible modules and the FUSE mount all use this one client.
With expect_pcr0 set, the client proves the enclave's identity (a fresh
attestation document with a random nonce, verified against a pinned root)
before it sends anything else.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from . import attestation, settings, wire
from .endpoints import Endpoint
from .errors import AttestationError, EnclaveError
from .wire import Connection

# What the client needs (cbor2, cryptography) and could not import, or None; the modules report it.
IMPORT_ERROR = attestation.IMPORT_ERROR or wire.IMPORT_ERROR

CHUNK = 1 << 20
IN_FLIGHT = 8  # concurrent chunk requests per transfer: keeps the pipe full without a big buffer


def default_trusted_roots() -> list:
    """AWS's Nitro root, plus the local backend's root when a local CA exists on this host."""
    local_root = settings.state_home() / "ca" / "root.pem"
    return attestation.load_trusted_roots([str(local_root)] if local_root.exists() else [])


_PCR0 = re.compile(r"[0-9a-f]{96}")


def release_pcr0(path) -> str:
    """The PCR0 of the image in a release manifest (release.json, as the owner's pipeline publishes it)."""
    try:
        release = json.loads(Path(path).read_text())
        pcr0 = release["image"]["measurements"]["pcr0"]
    except (OSError, ValueError) as err:
        raise EnclaveError(f"cannot read the release manifest {path}: {err}") from err
    except (KeyError, TypeError):
        raise EnclaveError(
            f"{path} is not a release manifest: it has no image.measurements.pcr0 "
            "(give the release.json the owner's pipeline published)"
        ) from None
    return _check_pcr0(pcr0, f"the PCR0 in {path}")


def _check_pcr0(value, what: str) -> str:
    if not isinstance(value, str) or not _PCR0.fullmatch(value.strip().lower()):
        shown = "empty" if value in ("", None) else f"{value!r:.40} is not 96 hex digits"
        raise EnclaveError(f"{what} is {shown}: give the image's PCR0 (SHA-384, 96 hex digits)")
    return value.strip().lower()


def expected_pcr0(
    expect_pcr0: str | Sequence[str] | None = None,
    release=None,
    no_attestation: bool = False,
    *,
    names: tuple[str, str, str] = ("--expect-pcr0", "--release", "--no-attestation"),
) -> list[str] | None:
    """The PCR0 values an enclave must attest before anything is sent to it, by the rule every front end
    (CLI, modules, FUSE mount) follows: the values given, else the release manifest's image, and None (no
    attestation) only when the user said so. names: how the caller spells the three options in messages."""
    expect_name, release_name, opt_out_name = names
    expect_label, release_label = expect_name.rstrip(":"), release_name.rstrip(":")
    given = [expect_pcr0] if isinstance(expect_pcr0, str) else list(expect_pcr0 or ())
    if expect_pcr0 is not None and not given:
        raise EnclaveError(f"{expect_label} lists no PCR0: give the image's PCR0 (96 hex digits)")
    values = [_check_pcr0(v, expect_label) for v in given]
    if release is not None and release != "":
        if values:
            raise EnclaveError(f"give {expect_label} or {release_label}, not both: the release names the PCR0 itself")
        values = [release_pcr0(release)]
    elif release == "":
        raise EnclaveError(f"{release_label} is empty: give the path of the owner's release.json")
    if no_attestation:
        if values:
            raise EnclaveError(f"{opt_out_name} contradicts {expect_label}/{release_label}: give one or the other")
        return None
    if not values:
        raise EnclaveError(
            "refusing to send anything to an enclave that has not proven its image: give its PCR0 "
            f"({expect_name} HEX, which the owner's pipeline prints and writes to release.json), or the owner's "
            f"release manifest ({release_name} release.json), or {opt_out_name} to send without attestation"
        )
    return values


def _safe_parts(rel: str) -> list[str]:
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise EnclaveError(f"the enclave listed an unsafe path {rel!r}; refusing to write it on the host")
    return parts


def local_manifest(root: Path) -> dict[str, dict]:
    """Files and directories under root (symlinks and special files skipped, never followed)."""
    out: dict[str, dict] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}{entry.name}"
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    out[rel] = {"path": rel, "type": "dir", "mode": st.st_mode & 0o777}
                    walk(Path(entry.path), rel + "/")
                elif stat.S_ISREG(st.st_mode):
                    out[rel] = {
                        "path": rel,
                        "type": "file",
                        "mode": st.st_mode & 0o777,
                        "size": st.st_size,
                        "sha256": _sha256(Path(entry.path)),
                    }

    walk(root, "")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _differs(src: dict, dst: dict | None) -> bool:
    return dst is None or dst["type"] != src["type"] or (src["type"] == "file" and src["sha256"] != dst["sha256"])


class EnclaveClient:
    def __init__(
        self,
        endpoint: Endpoint | str,
        *,
        expect_pcr0: str | Sequence[str] | None = None,
        trusted_roots: Sequence | None = None,
        allow_debug: bool = False,
        timeout: float | None = 10,
    ):
        if expect_pcr0 is not None and not expect_pcr0:  # never "no check" by accident
            raise EnclaveError("expect_pcr0 is empty: give the image's PCR0, or None to skip attestation")
        self.endpoint = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
        self.connection = Connection.open(self.endpoint, timeout=timeout)
        self.trusted_roots = trusted_roots
        self.allow_debug = allow_debug
        self.attested: attestation.AttestationDocument | None = None
        if expect_pcr0:
            try:
                self.attested = self.attest(expect_pcr0=expect_pcr0)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> EnclaveClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, op: str, args: dict | None = None, **kw):
        return self.connection.call(op, args, **kw)

    # -- attestation

    def attest(self, *, nonce: bytes | None = None, expect_pcr0=None) -> attestation.AttestationDocument:
        """A fresh document from the enclave, verified: signature, chain, nonce, age and PCR0 if given."""
        nonce = nonce if nonce is not None else os.urandom(32)
        document = self.call("attest", {"nonce": nonce})["document"]
        roots = self.trusted_roots if self.trusted_roots is not None else default_trusted_roots()
        try:
            return attestation.verify_document(
                document,
                trusted_roots=roots,
                expected_pcrs={0: expect_pcr0} if expect_pcr0 else None,
                nonce=nonce,
                allow_debug=self.allow_debug,
            )
        except AttestationError as err:
            raise AttestationError(
                f"the enclave at {self.endpoint} failed attestation, nothing was sent: {err}"
            ) from err

    # -- transfers

    def push(self, local_dir, remote_dir: str, *, dry_run: bool = False) -> dict:
        """Copy what differs from local_dir into the share's remote_dir (by SHA-256); nothing is deleted."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise EnclaveError(f"{local_dir} is not a directory: push copies a directory's contents")
        remote_root = "/" + remote_dir.strip("/")
        ours = local_manifest(local_dir)
        try:
            theirs = {e["path"]: e for e in self.call("share.manifest", {"path": remote_root})}
        except wire.RemoteError as err:
            if err.errno != errno.ENOENT:
                raise
            theirs = None  # a folder that does not exist yet: created below, as mkdir -p would
            top = self._top_level()
            if remote_root.split("/")[1] not in top:
                raise EnclaveError(
                    f"{remote_root} is not in one of the share's folders ({_shown(top)}): push into one of "
                    f"them, e.g. `enclave push {local_dir} /{top[0] if top else 'dataset'}`"
                ) from None
        changed = [e for e in ours.values() if _differs(e, (theirs or {}).get(e["path"]))]
        if not dry_run:
            if theirs is None:
                self._makedirs(remote_root)
            for entry in changed:
                remote = f"{remote_root}/{entry['path']}"
                if entry["type"] == "dir":
                    self.call("share.mkdir", {"path": remote, "mode": entry["mode"] | 0o700})
                else:
                    self._upload(local_dir / entry["path"], remote, entry["mode"])
        return {
            "changed": [e["path"] for e in changed],
            "unchanged": len(ours) - len(changed),
            "bytes": sum(e.get("size", 0) for e in changed),
        }

    def _top_level(self) -> list[str]:
        """The share's top-level folders (/dataset, /encrypted, /model, /output), as the enclave lists them."""
        return sorted(e["name"] for e in self.call("share.list", {"path": "/"}) if stat.S_ISDIR(e["mode"]))

    def _what_is_there(self, path: str) -> str:
        """What the nearest existing folder above path holds, for an error about a path that is not there."""
        parts = path.strip("/").split("/")
        for depth in range(len(parts) - 1, 0, -1):
            folder = "/" + "/".join(parts[:depth])
            try:
                entries = self.call("share.list", {"path": folder})
            except wire.RemoteError:
                continue
            names = sorted(e["name"] + ("/" if stat.S_ISDIR(e["mode"]) else "") for e in entries)
            return f"{folder} holds {_shown(names, folder + '/')}" if names else f"{folder} is empty"
        return f"the share's folders are {_shown(self._top_level())}"

    def _makedirs(self, remote: str) -> None:
        """Create remote and the folders above it that are missing (the top-level folder exists)."""
        parts = remote.strip("/").split("/")
        for depth in range(2, len(parts) + 1):
            try:
                self.call("share.mkdir", {"path": "/" + "/".join(parts[:depth]), "mode": 0o755})
            except wire.RemoteError as err:
                if err.errno != errno.EEXIST:
                    raise

    def _upload(self, src: Path, remote: str, mode: int) -> None:
        pending: deque = deque()
        with open(src, "rb", buffering=0) as f:
            first = f.read(CHUNK)
            # A small file goes whole with its create: one round trip. A server that does not know create's
            # data (an older image answers None, or a stat without it) gets it as a write after all.
            created = self.call("share.create", {"path": remote, "mode": mode, "data": first})
            if isinstance(created, dict) and created.get("size") == len(first):
                offset = len(first)
            else:
                offset = 0
                f.seek(0)
            while block := f.read(CHUNK):
                pending.append(self.connection.submit("share.write", {"path": remote, "offset": offset, "data": block}))
                offset += len(block)
                if len(pending) >= IN_FLIGHT:
                    pending.popleft().result()
        while pending:
            pending.popleft().result()

    def pull(self, remote_dir: str, local_dir, *, dry_run: bool = False) -> dict:
        """Copy what differs from the share's remote_dir into local_dir (by SHA-256); nothing is deleted."""
        local_dir = Path(local_dir)
        remote_root = "/" + remote_dir.strip("/")
        try:
            theirs = self.call("share.manifest", {"path": remote_root})
        except wire.RemoteError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            raise EnclaveError(
                f"{remote_root} is not a folder in the enclave's share ({self._what_is_there(remote_root)}): "
                "pull a folder that is there, e.g. `enclave pull /output DIR`"
            ) from None
        for entry in theirs:
            _safe_parts(entry["path"])
        ours = local_manifest(local_dir) if local_dir.is_dir() else {}
        changed = [e for e in theirs if _differs(e, ours.get(e["path"]))]
        if not dry_run:
            local_dir.mkdir(parents=True, exist_ok=True)
            for entry in changed:
                target = local_dir.joinpath(*_safe_parts(entry["path"]))
                _refuse_links(local_dir, target)
                if entry["type"] == "dir":
                    target.mkdir(exist_ok=True)
                else:
                    self._download(f"{remote_root}/{entry['path']}", target, entry)
        return {
            "changed": [e["path"] for e in changed],
            "unchanged": len(theirs) - len(changed),
            "bytes": sum(e.get("size", 0) for e in changed),
        }

    def _download(self, remote: str, target: Path, entry: dict) -> None:
        # A short random name beside the target (O_EXCL, mode 0600): the target's own name may already
        # take the 255 bytes a name can have.
        fd, tmp_name = tempfile.mkstemp(prefix=".pull-", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f:
                pending: deque = deque()
                for offset in range(0, entry["size"], CHUNK):
                    pending.append(
                        self.connection.submit("share.read", {"path": remote, "offset": offset, "size": CHUNK})
                    )
                    if len(pending) >= IN_FLIGHT:
                        _write_block(f, digest, pending.popleft().result())
                while pending:
                    _write_block(f, digest, pending.popleft().result())
            if digest.hexdigest() != entry["sha256"]:
                raise EnclaveError(f"{remote} changed while it was being pulled; pull again")
            os.chmod(tmp, entry["mode"] & 0o755 | 0o600)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # -- jobs

    def run(
        self,
        package: str,
        script: str,
        args: str | Sequence[str] = (),
        *,
        kms: dict,
        on_output: Callable[[str, bytes], None] | None = None,
        timeout: float | None = None,
        clear_output: bool = False,
    ) -> dict:
        """Run script from package in the enclave; stdout/stderr reach on_output live; returns the job summary.

        The enclave refuses to start over files left in /output unless clear_output (then it removes them)."""
        request = {
            "package": package if package.startswith("/") else f"/encrypted/{package}",
            "script": script,
            "args": args if isinstance(args, str) else list(args),
            "kms": kms,
        }
        if timeout:
            request["timeout"] = timeout
        if clear_output:
            request["clear_output"] = True

        def on_event(event):
            if on_output and isinstance(event, dict) and event.get("type") in ("stdout", "stderr"):
                on_output(event["type"], event["data"])

        try:
            return self.connection.stream("job.run", request, on_event=on_event)
        except wire.RemoteError as err:
            if err.errno != errno.ENOENT or self._exists(request["package"]):
                raise
            raise EnclaveError(
                f"there is no package {request['package']} in the enclave's share: "
                f"{self._what_is_there(request['package'])}; name one of those, or copy the owner's package "
                "there first (`enclave push DIR /encrypted`, DIR holding the .pkg file)"
            ) from None

    def _exists(self, path: str) -> bool:
        try:
            self.call("share.stat", {"path": path})
        except wire.RemoteError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise
        return True


def _shown(names: Sequence[str], prefix: str = "/", limit: int = 20) -> str:
    """'/dataset, /model' (at most limit names, then how many more)."""
    shown = ", ".join(prefix + n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _write_block(f, digest, block: bytes) -> None:
    f.write(block)
    digest.update(block)


def _refuse_links(root: Path, target: Path) -> None:
    """Refuse to write through a symlink anywhere between root and target on the host."""
    current = root
    for part in target.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise EnclaveError(f"{current} is a symbolic link: refusing to write through it; remove it and pull again")


def host_kms_settings(region: str | None = None, profile: str | None = None, *, need_region: bool = True) -> dict:
    """Region and credentials from the host's boto3 configuration (on nitro: the instance role via IMDSv2).

    need_region=False checks the credentials alone (a pre-flight run before the region is decided)."""
    import boto3

    with settings.aws_errors():  # partial credentials or an unknown profile: one line saying what to set
        session = boto3.session.Session(profile_name=profile, region_name=region)
        credentials = session.get_credentials()
    if credentials is None:
        raise EnclaveError("no AWS credentials on this host for KMS: configure a profile or the instance role")
    frozen = credentials.get_frozen_credentials()
    out = {
        "region": session.region_name,
        "aws_access_key_id": frozen.access_key,
        "aws_secret_access_key": frozen.secret_key,
    }
    if frozen.token:
        out["aws_session_token"] = frozen.token
    if not out["region"] and need_region:
        raise EnclaveError("no AWS region configured: pass --region or set AWS_REGION")
    return out
