"""What the enclave image carries: the enclave server and the project modules it imports.

One function, enclave_sources, decides it for both backends: the local image archives
its result (enclave_local/image.py) and the EIF's build context stages the same files
for the Dockerfile to copy (runtime.stage_image_context). So host-only code (mounts.py,
module_options.py, cli/, enclave_local/) never enters a measurement on either backend,
and the two backends measure the same code.

Every file of enclave_server/ is carried; the project modules it imports, directly or
not, are found by reading the source (ast), imports inside functions included (they run
in the enclave too), with their packages' __init__.py.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shlex
from pathlib import Path

from .errors import ImageError

PACKAGE_PATH = "ansible_collections/confidential_ml/nitro"
PACKAGE_NAME = PACKAGE_PATH.replace("/", ".")
ENCLAVE_DIR = "enclave_server"
HOST_SIDE = ("cli/", "enclave_local/")
SKIPPED_DIRS = {"__pycache__"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")
DISTRIBUTION = "confidential-ml-nitro"  # the Python package that installs the collection (pyproject.toml)


def _read_file(path: Path) -> bytes:
    if path.is_symlink() or not path.is_file():
        raise ImageError(f"{path} is not a regular file: an image holds only regular files; replace it")
    return path.read_bytes()


def imports(path: str, content: bytes) -> set[str]:
    """Module names a Python file imports, absolute; for `from X import y`, both X and X.y
    (y may be a submodule). Imports inside functions count: they run in the enclave too."""
    return _imports(path, content)[0]


def _imports(path: str, content: bytes) -> tuple[set[str], set[str]]:
    """(imports(), the modules that must exist for the file to import: X of `import X`, `from X import y`)."""
    try:
        tree = ast.parse(content, filename=path)
    except SyntaxError as err:
        raise ImageError(f"{path} is not valid Python ({err.msg}, line {err.lineno}): fix it before building") from None
    # Relative imports start from the file's package: its directory (for __init__.py, the package itself).
    package = f"{PACKAGE_NAME}.{Path(path).parent.as_posix().replace('/', '.')}"
    names: set[str] = set()
    required: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            required.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            required.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names, required


def _relative(module: str) -> str:
    """A module of this project as a path under the project tree, without suffix."""
    return module[len(PACKAGE_NAME) + 1 :].replace(".", "/")


def _project_file(source: Path, module: str) -> str | None:
    """The file under source that defines a module of this project, if any."""
    rel = _relative(module)
    for candidate in (f"{rel}.py", f"{rel}/__init__.py"):
        if (source / candidate).is_file():
            return candidate
    return None


def enclave_sources(source: str | os.PathLike) -> dict[str, bytes]:
    """{path under the package: content}: every file of enclave_server/, and the project's
    Python modules it imports, directly or not (with their packages' __init__.py), sorted."""
    source = Path(source)
    top = source / ENCLAVE_DIR
    if not top.is_dir():
        raise ImageError(f"{top} is not a directory: the source must be a project tree holding {ENCLAVE_DIR}/")
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            if not name.endswith(SKIPPED_SUFFIXES):
                path = Path(dirpath, name)
                files[path.relative_to(source).as_posix()] = _read_file(path)
    todo = [path for path in files if path.endswith(".py")]
    while todo:
        importer = todo.pop()
        names, required = _imports(importer, files[importer])
        for module in names:
            if not module.startswith(PACKAGE_NAME + "."):
                continue
            found = _project_file(source, module)
            if found is None and module in required and not (source / _relative(module)).is_dir():
                # An image without it would fail at start, in the enclave, where it is hardest to see.
                raise ImageError(
                    f"{importer} imports {module}, which is not in {source}: "
                    "the source must be a whole project tree (the enclave code imports it)"
                )
            if found is None or found in files:
                continue
            if found.startswith(HOST_SIDE):
                raise ImageError(
                    f"the enclave code imports {module} ({found} in {source}), which is host-side code: "
                    "move what the enclave needs into enclave_server/, or into nitro_api/ if the host side needs it too"
                )
            parts = found.split("/")
            for depth in range(1, len(parts)):  # the packages on the way must import too
                init = "/".join(parts[:depth]) + "/__init__.py"
                if init not in files and (source / init).is_file():
                    files[init] = _read_file(source / init)
                    todo.append(init)
            files[found] = _read_file(source / found)
            todo.append(found)
    return dict(sorted(files.items()))


# ---------------------------------------------------------------- what the enclave runs

DOCKERFILE_PATH = "enclave_server/Dockerfile"


def collection_root() -> Path:
    """The tree this project's own enclave image is built from: the collection that holds enclave_server/ (and
    its Dockerfile) beside plugins/module_utils/.

    The tree this file sits in (a checkout, an installed collection); else, where module_utils travels alone (an
    AnsiballZ payload), the installed Python package's. ImageError, saying what to do, when neither holds it."""
    import importlib.metadata  # here: every module imports this file (through runtime), few build an image

    candidates = [Path(__file__).resolve().parents[2]]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        # locate_file gives a path-like object, a pathlib.Path for an installed wheel (a zipfile.Path from a zip)
        candidates.append(Path(str(importlib.metadata.distribution(DISTRIBUTION).locate_file(PACKAGE_PATH))))
    for root in candidates:
        if (root / DOCKERFILE_PATH).is_file():
            return root
    raise ImageError(
        f"this collection's enclave image is built from its {ENCLAVE_DIR}/ ({DOCKERFILE_PATH} and the code beside "
        f"it), and neither {candidates[0]} nor an installed {DISTRIBUTION} Python package holds it: install the "
        f"package where this runs (pip install {DISTRIBUTION}), or give the image's source"
    )


IMAGE_PYTHON = "/usr/local/bin/python3"
"""Where the Dockerfile's base image (python:3.11-slim-bookworm) installs Python."""

# The base image's own configuration, which the EIF inherits: its Cmd, and of its Env what this
# project's code reads (it also sets GPG_KEY and PYTHON_VERSION, which nothing here reads).
BASE_ENV = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
BASE_CMD = [IMAGE_PYTHON.rsplit("/", 1)[1]]

INIT_PATH = "/sbin:/usr/sbin:/bin:/usr/bin"
"""The PATH the enclave's init (aws-nitro-enclaves-sdk-bootstrap init.c) gives execvpe to find
argv[0]: not the image's PATH, so a command naming `python3` alone is not found in the EIF."""


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments): comment lines dropped, continuation lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), (line.split(None, 1) + [""])[1].strip())
        for line in joined.splitlines()
        if line.strip()
    ]


def _command_form(instruction: str, arguments: str) -> list[str]:
    if arguments.startswith("["):  # exec form: a JSON array of strings
        try:
            argv = json.loads(arguments)
        except ValueError as err:
            raise ImageError(f"the Dockerfile's {instruction} {arguments} is not a JSON array: {err}") from None
        if not isinstance(argv, list) or not argv or not all(isinstance(word, str) for word in argv):
            raise ImageError(f"the Dockerfile's {instruction} must be a non-empty JSON array of strings")
        return argv
    return ["/bin/sh", "-c", arguments]  # shell form, as docker stores it


def _env_pairs(arguments: str) -> list[tuple[str, str]]:
    words = shlex.split(arguments)
    if words and "=" not in words[0]:  # the legacy form: ENV NAME value with spaces
        return [(words[0], " ".join(words[1:]))]
    pairs = []
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ImageError(f"the Dockerfile's ENV {arguments} is not NAME=value ...")
        pairs.append((name, value))
    return pairs


def image_command(dockerfile: str) -> dict:
    """What the EIF built from this Dockerfile runs: {"argv", "env", "cwd"}.

    nitro-cli's EIF builder (enclave_build/src/docker.rs, extract_image) takes the image's Cmd
    if it has one, otherwise its Entrypoint, never both, with the image's Env; the enclave's init
    execvpe()s that argv as root, in "/" whatever WORKDIR says, with INIT_PATH to find argv[0].
    Docker's own rules make the image's Cmd and Entrypoint: the last CMD and ENTRYPOINT of the
    final stage, a Cmd inherited from the base image reset by an ENTRYPOINT."""
    env = dict(BASE_ENV)
    cmd: list[str] | None = list(BASE_CMD)
    inherited_cmd = True
    entrypoint: list[str] | None = None
    for instruction, arguments in _dockerfile_instructions(dockerfile):
        if instruction == "FROM":  # a stage starts from the base: only the final one is the image
            env, cmd, inherited_cmd, entrypoint = dict(BASE_ENV), list(BASE_CMD), True, None
        elif instruction == "ENV":
            for name, value in _env_pairs(arguments):
                if "$" in value:
                    raise ImageError(f"the Dockerfile's ENV {name} uses a variable ({value}): write the value out")
                env[name] = value
        elif instruction == "CMD":
            cmd, inherited_cmd = _command_form(instruction, arguments), False
        elif instruction == "ENTRYPOINT":
            entrypoint = _command_form(instruction, arguments)
            if inherited_cmd:
                cmd = None
    argv = cmd or entrypoint
    if not argv:
        raise ImageError("the Dockerfile gives the image neither a CMD nor an ENTRYPOINT: the EIF would run nothing")
    return {"argv": argv, "env": [f"{name}={value}" for name, value in env.items()], "cwd": "/"}
