"""A benchmark calls checkout.use() before importing the project: it measures this source tree, never an
installed copy."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = ROOT / "collections"


def use() -> None:
    """Link the checkout as collections/ansible_collections/confidential_ml/nitro (as the Makefile and
    tests/conftest.py do) and put collections/ on sys.path, and on PYTHONPATH for the processes started."""
    link = COLLECTIONS / "ansible_collections" / "confidential_ml" / "nitro"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT)
    if str(COLLECTIONS) not in sys.path:
        sys.path.insert(0, str(COLLECTIONS))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COLLECTIONS), os.environ.get("PYTHONPATH")]))


def compile_bytecode() -> None:
    """Bytecode for the checkout's modules, as an installed copy has it (pip compiles on install). Without it a
    command run where PYTHONDONTWRITEBYTECODE is set (this machine's environment) compiles the project's
    modules again in every process: ~60 ms of a command's start, which no installed copy pays."""
    import compileall

    for folder in ("cli", "plugins", "enclave_server", "enclave_local", "nitro_api"):
        if (ROOT / folder).is_dir():
            compileall.compile_dir(ROOT / folder, quiet=1)
