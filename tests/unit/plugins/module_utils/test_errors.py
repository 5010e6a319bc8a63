"""One error hierarchy: what a caller may catch lives in errors.py, under EnclaveError, named *Error."""

import ast
import errno
import inspect
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import errors

ROOT = Path(__file__).resolve().parents[4]
SOURCES = ("plugins", "cli", "enclave_server", "enclave_local", "nitro_api")
# Control flow that never leaves its module: private by name, or doctor's "this step does not apply".
PRIVATE = {("cli/doctor.py", "Skipped")}


def _error_classes():
    return [c for _name, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BaseException)]


def test_every_error_in_errors_py_is_an_enclave_error_named_error():
    classes = _error_classes()
    assert len(classes) >= 20
    for cls in classes:
        assert issubclass(cls, errors.EnclaveError), cls
        assert cls.__name__.endswith("Error"), cls
        assert cls.__module__ == errors.__name__, cls  # defined there, not imported into it


def _raised_classes(path: Path):
    """Classes in a file whose bases look like exceptions (a name ending in Error or Exception)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = [
                b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases
            ]
            if any(b.endswith(("Error", "Exception", "Failure")) or b in ("Exception", "BaseException") for b in bases):
                yield node.name


def test_no_public_error_class_lives_outside_errors_py():
    found = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "plugins/module_utils/errors.py":
                continue
            found += [
                f"{rel}: {name}"
                for name in _raised_classes(path)
                if not name.startswith("_") and (rel, name) not in PRIVATE
            ]
    assert found == [], "move these to plugins/module_utils/errors.py, under EnclaveError"


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (errors.ConnectionClosedError, ConnectionError),
        (errors.CallTimeoutError, TimeoutError),
        (errors.RemoteError, OSError),
        (errors.JobError, OSError),
        (errors.EndpointError, ValueError),
        (errors.EndpointUnreachableError, ConnectionError),
        (errors.EnclaveNotFoundError, errors.EnclaveRuntimeError),
        (errors.KmsCallError, errors.KmsError),
        (errors.KmsApiError, errors.KmsError),
        (errors.ProtocolError, errors.WireError),
        (errors.FrameTooLargeError, errors.WireError),
    ],
)
def test_errors_keep_the_families_callers_catch(cls, builtin):
    assert issubclass(cls, builtin) and issubclass(cls, errors.EnclaveError)


def test_a_job_error_reads_as_its_message_as_it_did_on_the_wire():
    err = errors.JobError(errno.EBUSY, "busy: job abc is running; wait for it")
    assert err.errno == errno.EBUSY and err.strerror == "busy: job abc is running; wait for it"
    assert str(err) == "busy: job abc is running; wait for it"
