"""The local enclave image: a reproducible archive of the enclave server, and its measurement.

An image is an uncompressed POSIX tar (pax) holding

    runtime.json   what the code runs on: the Python interpreter's identity and a lock of
                   the installed distributions the enclave code imports (name, version,
                   SHA-256 of the distribution's RECORD, which lists a hash of every file),
                   the interpreter's start-up hooks (site_hooks: .pth files, sitecustomize)
                   and what the enclave runs (runtime.json "command": argv, env, cwd), read from
                   enclave_server/Dockerfile under nitro-cli's rule (enclave_code.image_command)
    app/.../owner_identity.json   the owner's package-signing keys (owner_identity.py), when the
                   image is bound to its owner: beside enclave_server/, where the server looks for it
    app/...        the enclave code: enclave_code.enclave_sources, the same files the EIF's build
                   context carries (every file of enclave_server/ and the project modules it
                   imports), under app/ansible_collections/confidential_ml/nitro/, which the local
                   runtime mounts at /opt/enclave as the Dockerfile copies it. Host-side code
                   (cli/, enclave_local/) is never carried: importing it from the enclave code
                   fails the build; a change to host-only modules leaves the measurement alone.

Entries are sorted, regular files only, mode 0644, uid/gid 0, no owner names, mtime 0, and
nothing is compressed, so the same inputs give the same bytes on any machine and at any time.

Measurements, all SHA-384 in lowercase hex, as Nitro's PCRs are:

    PCR0  the image file:           sha384sum image.eif
    PCR1  the runtime ("kernel"):   sha384 of runtime.json as stored in the image
    PCR2  the application:          sha384 of the sha384sum listing of app/, sorted by path:
                                    (cd app && find . -type f -printf '%P\\n' | LC_ALL=C sort \\
                                        | xargs sha384sum) | sha384sum

PCR0 covers the other two, so any change to the code, the interpreter or a locked
dependency gives another PCR0. The dependencies themselves are not copied into the
image: the local runtime runs the host's installed copies, and refuses to launch an
image whose lock no longer matches them (see Image.check_host). The lock holds what the
enclave code imports (found the same way) and, from their metadata, what those need in turn.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import platform
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..plugins.module_utils.enclave_code import (
    DOCKERFILE_PATH,
    PACKAGE_PATH,
    collection_root,
    enclave_sources,
    image_command,
    imports,
)
from ..plugins.module_utils.errors import ImageError
from ..plugins.module_utils.runtime import (
    OWNER_IDENTITY_FILE,
    BuildResult,
    Measurements,
    checked_owner_identity,
)

IMAGE_FORMAT = "confidential-ml-nitro/local-image/2"
RUNTIME_ENTRY = "runtime.json"
APP_PREFIX = "app/"
PROJECT_DISTRIBUTION = "confidential-ml-nitro"
MAX_IMAGE_BYTES = 256 << 20


def sha384_hex(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


# ---------------------------------------------------------------- runtime: interpreter and dependency lock


def python_identity() -> dict:
    """The interpreter the enclave runs on: version, platform and the SHA-256 of its binaries."""
    binaries = [Path(sys.executable).resolve()]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        binaries.append(Path(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")).resolve())
    return {
        "implementation": sys.implementation.name,
        "version": platform.python_version(),
        "cache_tag": sys.implementation.cache_tag,
        "machine": platform.machine(),
        "binaries": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in binaries},
    }


def site_hooks() -> list[dict]:
    """What the interpreter runs at every start, before any code of the enclave or of a job: each .pth file
    in its site directories (a line starting with "import" is executed; python -I does not turn that off)
    and sitecustomize / usercustomize. A .pth dropped in by hand is in no distribution's RECORD, so the
    dependency lock cannot see it: name and SHA-256 of each are measured here."""
    import importlib.util
    import site

    hooks = {}
    for directory in site.getsitepackages():
        for path in sorted(Path(directory).glob("*.pth")):
            hooks[path.name] = path
    for module in ("sitecustomize", "usercustomize"):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            hooks[f"{module}.py"] = Path(spec.origin)
    return [{"file": name, "sha256": hashlib.sha256(hooks[name].read_bytes()).hexdigest()} for name in sorted(hooks)]


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def _requirements(dist: importlib.metadata.Distribution) -> list[str]:
    """Names of the distributions dist needs here (markers evaluated, extras left out)."""
    from packaging.requirements import InvalidRequirement, Requirement

    names = []
    for text in dist.requires or ():
        try:
            requirement = Requirement(text)
        except InvalidRequirement as err:
            raise ImageError(f"{dist.metadata['Name']} declares an unreadable requirement {text!r}: {err}") from None
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(requirement.name)
    return names


def dependency_lock(imported: set[str]) -> list[dict]:
    """Every installed distribution the imported modules come from, and what those need in turn."""
    # ansible_collections is the project's own namespace (other distributions, such as ansible, share it).
    top_level = {name.split(".")[0] for name in imported} - {"ansible_collections", "__future__"}
    providers = importlib.metadata.packages_distributions()
    todo = sorted({dist for name in top_level - set(sys.stdlib_module_names) for dist in providers.get(name, ())})
    lock: dict[str, dict] = {}
    while todo:
        wanted = todo.pop()
        name = _canonical(wanted)
        if name in lock or name == PROJECT_DISTRIBUTION:
            continue
        try:
            dist = importlib.metadata.distribution(wanted)
        except importlib.metadata.PackageNotFoundError:
            raise ImageError(
                f"the enclave code needs the distribution {wanted!r}, which is not installed here: install it "
                "(pip install the project) and build again"
            ) from None
        record = dist.read_text("RECORD")
        if record is None:
            raise ImageError(
                f"{dist.metadata['Name']} {dist.version} has no RECORD, so its files cannot be locked: "
                "reinstall it with pip"
            )
        lock[name] = {
            "name": name,
            "version": dist.version,
            "record_sha256": hashlib.sha256(record.encode()).hexdigest(),
        }
        todo.extend(_requirements(dist))
    return [lock[name] for name in sorted(lock)]


def runtime_description(files: dict[str, bytes]) -> dict:
    if DOCKERFILE_PATH not in files:
        raise ImageError(f"the enclave code has no {DOCKERFILE_PATH}: it says what the enclave runs")
    imported: set[str] = set()
    for path, content in files.items():
        if path.endswith(".py"):
            imported |= imports(path, content)
    return {
        "format": IMAGE_FORMAT,
        # What the enclave runs, from the Dockerfile under nitro-cli's rule, as the EIF gets it.
        "command": image_command(files[DOCKERFILE_PATH].decode()),
        "python": python_identity(),
        "dependencies": dependency_lock(imported),
        "site_hooks": site_hooks(),
    }


def _canonical_json(data) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


# ---------------------------------------------------------------- the archive


def _entry(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def archive(runtime: bytes, files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_entry(RUNTIME_ENTRY, len(runtime)), io.BytesIO(runtime))
        for path in sorted(files):
            content = files[path]
            tar.addfile(_entry(f"{APP_PREFIX}{PACKAGE_PATH}/{path}", len(content)), io.BytesIO(content))
    return buffer.getvalue()


def application_digest(app: dict[str, bytes]) -> str:
    """PCR2: SHA-384 of the sha384sum listing of the app files (paths relative to app/, sorted)."""
    listing = "".join(f"{sha384_hex(app[path])}  {path}\n" for path in sorted(app))
    return sha384_hex(listing.encode())


@dataclass(frozen=True)
class Image:
    """A parsed image: its bytes, its runtime description, its app files and their measurements."""

    data: bytes
    runtime: dict
    app: dict[str, bytes]  # paths relative to app/
    measurements: Measurements

    @classmethod
    def parse(cls, data: bytes, *, origin: str = "the image") -> Image:
        runtime_bytes = None
        app: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    extracted = tar.extractfile(member) if member.isfile() else None
                    if extracted is None:
                        raise ImageError(f"{origin} holds {member.name!r}, which is not a regular file")
                    content = extracted.read()
                    if member.name == RUNTIME_ENTRY and runtime_bytes is None:
                        runtime_bytes = content
                    elif member.name.startswith(APP_PREFIX) and member.name[len(APP_PREFIX) :] not in app:
                        app[member.name[len(APP_PREFIX) :]] = content
                    else:
                        raise ImageError(f"{origin} holds an unexpected or repeated entry {member.name!r}")
        except tarfile.TarError as err:
            raise ImageError(
                f"{origin} is not a local enclave image ({err}): build one with `enclave local build`"
            ) from None
        if runtime_bytes is None:
            raise ImageError(f"{origin} has no {RUNTIME_ENTRY}: build it with `enclave local build`")
        try:
            runtime = json.loads(runtime_bytes)
        except ValueError as err:
            raise ImageError(f"{origin} has an unreadable {RUNTIME_ENTRY}: {err}") from None
        if not isinstance(runtime, dict) or runtime.get("format") != IMAGE_FORMAT:
            raise ImageError(
                f"{origin} is not in the format this runtime runs ({IMAGE_FORMAT}): "
                "rebuild it with `enclave local build`"
            )
        measurements = Measurements(pcr0=sha384_hex(data), pcr1=sha384_hex(runtime_bytes), pcr2=application_digest(app))
        return cls(data, runtime, app, measurements)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Image:
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise ImageError(f"{path} is {size} bytes, more than a local image can be ({MAX_IMAGE_BYTES})")
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"no image at {path}: build one with `enclave local build --output {path}`") from None
        except OSError as err:
            raise ImageError(f"cannot read the image {path}: {err.strerror or err}") from None
        return cls.parse(data, origin=str(path))

    def check_host(self) -> None:
        """Refuse to run an image whose interpreter or locked dependencies differ from this host's."""
        problems = []
        built_for, here = self.runtime.get("python"), python_identity()
        if built_for != here:
            problems.append(
                f"it was built for Python {_describe_python(built_for)}, this host runs {_describe_python(here)}"
            )
        for entry in self.runtime.get("dependencies", ()):
            try:
                dist = importlib.metadata.distribution(entry["name"])
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{entry['name']} {entry['version']} is not installed")
                continue
            record = dist.read_text("RECORD") or ""
            if (
                dist.version != entry["version"]
                or hashlib.sha256(record.encode()).hexdigest() != entry["record_sha256"]
            ):
                problems.append(
                    f"{entry['name']} {entry['version']} is installed here as another build ({dist.version})"
                )
        built_hooks = {(h["file"], h["sha256"]) for h in self.runtime.get("site_hooks") or ()}
        hooks_here = {(h["file"], h["sha256"]) for h in site_hooks()}
        if built_hooks != hooks_here:
            differ = sorted({entry[0] for entry in built_hooks ^ hooks_here})
            problems.append(f"the interpreter's start-up hooks differ ({', '.join(differ)})")
        if problems:
            raise ImageError(
                "this image does not match this host, so it would not run the code it measured: "
                + "; ".join(problems)
                + ". Rebuild it here with `enclave local build` (and publish its new PCR0 in the key policy)"
            )


def _describe_python(identity) -> str:
    if not isinstance(identity, dict):
        return "(unknown)"
    return f"{identity.get('implementation')} {identity.get('version')} on {identity.get('machine')}"


def build(
    output: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    owner_identity: str | os.PathLike | None = None,
) -> BuildResult:
    """Write the image of the enclave code under source (default: this project) to output, bound to the owner
    identity file (the owner's package-signing keys) if one is given: then PCR0 measures those keys too."""
    source_dir = Path(source) if source is not None else collection_root()
    files = enclave_sources(source_dir)
    runtime = _canonical_json(runtime_description(files))
    if owner_identity is not None:
        files[OWNER_IDENTITY_FILE] = checked_owner_identity(owner_identity)
    data = archive(runtime, files)
    image = Image.parse(data)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a crash never leaves half an image where a good one was.
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return BuildResult(image=str(output), measurements=image.measurements)
