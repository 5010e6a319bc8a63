"""settings: the local runtime's short directory for sockets, and what it refuses to use."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import settings
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError


@pytest.fixture
def runtime_base(monkeypatch):
    """A short $ENCLAVE_RUNTIME_DIR (not created yet): socket paths under it must fit in 107 bytes."""
    parent = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    base = parent / "rt"
    monkeypatch.setenv(settings.ENV_RUNTIME_DIR, str(base))
    yield base
    shutil.rmtree(parent)


def test_runtime_dir_is_short_private_and_one_per_home(runtime_base, tmp_path):
    deep = tmp_path / ("d" * 200) / "home"
    first = settings.runtime_dir(deep)
    assert first.parent == runtime_base and len(first.name) == 12
    assert settings.runtime_dir(deep) == first  # the same home, the same directory
    assert settings.runtime_dir(tmp_path / "other") != first
    for path in (runtime_base, first):
        assert path.is_dir() and (path.stat().st_mode & 0o777) == 0o700


def test_the_default_does_not_depend_on_the_home(monkeypatch, tmp_path):
    monkeypatch.delenv(settings.ENV_RUNTIME_DIR, raising=False)
    monkeypatch.setenv(settings.ENV_HOME, str(tmp_path / ("h" * 150)))
    path = settings.runtime_dir()
    assert len(str(path)) + settings.LOCAL_SOCKET_SUFFIX <= 107
    expected = "/run/cmlnitro" if os.geteuid() == 0 else f"/tmp/cmlnitro-{os.geteuid()}"
    assert str(path.parent) == expected


def test_a_runtime_dir_too_long_for_sockets_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.ENV_RUNTIME_DIR, str(tmp_path / ("r" * 60)))
    with pytest.raises(EnclaveError, match="ENCLAVE_RUNTIME_DIR to a directory of at most") as raised:
        settings.runtime_dir(tmp_path / "home")
    assert "ENCLAVE_HOME does not matter" in str(raised.value)
    assert not (tmp_path / ("r" * 60)).exists()


def test_a_runtime_dir_prepared_by_someone_else_is_refused(runtime_base, tmp_path):
    # The host's other users can create names under /tmp first: a link, an open directory, or one of theirs.
    home = tmp_path / "home"
    runtime_base.mkdir(mode=0o700)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    target = runtime_base / settings.runtime_dir(home).name
    target.rmdir()

    target.symlink_to(theirs)
    with pytest.raises(EnclaveError, match="must be a directory owned by uid .* with mode 0700"):
        settings.runtime_dir(home)
    target.unlink()

    target.mkdir(mode=0o755)
    target.chmod(0o755)
    with pytest.raises(EnclaveError, match="remove it, or set ENCLAVE_RUNTIME_DIR"):
        settings.runtime_dir(home)
    target.chmod(0o700)
    assert settings.runtime_dir(home) == target

    if os.geteuid() == 0:
        os.chown(target, 65534, 65534)
        with pytest.raises(EnclaveError, match="must be a directory owned by uid 0"):
            settings.runtime_dir(home)
