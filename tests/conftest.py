"""Make the source tree importable as ansible_collections.confidential_ml.nitro.

The Makefile links the checkout under collections/ansible_collections/...; tests
and the subprocesses they start import from there, so they always run the
source, not a stale installed copy.
"""

import os
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests check what happens, never how fast: no per-example deadline (hypothesis's 200 ms default failed
# a CMS fuzz on a loaded machine) and no too_slow health check. A test's own @settings still sets its examples.
settings.register_profile("untimed", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("untimed")

ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = ROOT / "collections"
_link = COLLECTIONS / "ansible_collections" / "confidential_ml" / "nitro"
if not _link.exists():
    _link.parent.mkdir(parents=True, exist_ok=True)
    _link.symlink_to(ROOT)
if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COLLECTIONS), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("ANSIBLE_COLLECTIONS_PATH", str(COLLECTIONS))
# boto3 must never reach for real AWS credentials or regions from the machine.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

# Tests press Ctrl-C on the CLI (SIGINT). A shell starts a background job (`make test &`) with SIGINT ignored, which
# every process the suite starts would inherit, and a Python started so never raises KeyboardInterrupt: the CLI
# would ignore the test's Ctrl-C and the test would hang (three did, in a run started with &).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Fixtures that start servers are plugins every test directory may use; tests import their helpers from them,
# never from a conftest.
pytest_plugins = ["ansible_collections.confidential_ml.nitro.tests.fixtures.served"]


# The fast tier (make test-fast) is every test that starts no enclave, no local cloud, no ansible-playbook and
# no FUSE mount. All of tests/integration/ does; elsewhere the fixtures that start them say so.
_STARTS_SERVERS = {"enclave", "local_cloud", "owner_release", "ansible_playbook"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (--dist loadgroup, make test)
def pytest_collection_modifyitems(items):
    integration = ROOT / "tests" / "integration"
    for item in items:
        if integration in Path(item.path).resolve().parents or _STARTS_SERVERS & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


_SHARED_SCOPES = {"class", "module", "package"}


def _xdist_group(item) -> str | None:
    """Where pytest-xdist must keep a test with others (make test: --dist loadgroup): the tests of the session's
    owner release on one worker, so that owner.yml runs once; a file whose tests share a module fixture (an image
    build, a KMS server) on one worker, so that it is built once. Any other test goes wherever a worker is free."""
    if "owner_release" in item.fixturenames:
        return "owner_release"
    definitions = getattr(item, "_fixtureinfo", None)
    for chain in definitions.name2fixturedefs.values() if definitions else ():
        scope = chain[-1].scope
        if getattr(scope, "value", scope) in _SHARED_SCOPES:
            return item.location[0]
    return None
