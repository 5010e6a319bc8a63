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

    # A shared directory named as the base is refused, and never to be removed.
    runtime_base.chmod(0o1777)
    with pytest.raises(EnclaveError, match=r"0700 \(it holds the local enclaves' sockets\), but it is not: set ENCL"):
        settings.runtime_dir(home)
    runtime_base.chmod(0o700)

    if os.geteuid() == 0:
        os.chown(target, 65534, 65534)
        with pytest.raises(EnclaveError, match="must be a directory owned by uid 0"):
            settings.runtime_dir(home)


# ---------------------------------------------------------------- boto3 configuration errors


@pytest.fixture
def bare_aws(monkeypatch, tmp_path):
    """No AWS configuration at all: no variables, no shared files, no instance metadata."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.mark.parametrize(
    ("environment", "options", "says"),
    [
        ({"AWS_ACCESS_KEY_ID": "a", "AWS_DEFAULT_REGION": "us-east-1"}, {},
         "incomplete AWS credentials in the environment: AWS_SECRET_ACCESS_KEY is not set"),
        ({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}, {},
         "no AWS region configured for KMS: set AWS_DEFAULT_REGION"),
        ({"AWS_DEFAULT_REGION": "us-east-1"}, {}, "no AWS credentials found for KMS: set AWS_ACCESS_KEY_ID and"),
        ({"AWS_DEFAULT_REGION": "us-east-1"}, {"profile": "nope"}, "the AWS profile 'nope' is not in ~/.aws/config"),
        ({"AWS_DEFAULT_REGION": "us-east-1"}, {"access_key": "a"},
         "an AWS access key id was given without its secret access key"),
        ({"AWS_DEFAULT_REGION": "us-east-1"}, {"secret_key": "b"},
         "an AWS secret access key was given without its access key id"),
    ],
)  # fmt: skip
def test_kms_client_says_what_to_set(bare_aws, environment, options, says):
    for name, value in environment.items():
        bare_aws.setenv(name, value)
    with pytest.raises(EnclaveError) as raised:
        settings.kms_client(endpoint_url="http://127.0.0.1:9", **options)
    assert str(raised.value).startswith(says) and "\n" not in str(raised.value)


def test_kms_client_with_a_complete_configuration(bare_aws):
    bare_aws.setenv("AWS_ACCESS_KEY_ID", "a")
    bare_aws.setenv("AWS_SECRET_ACCESS_KEY", "b")
    client = settings.kms_client(endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    assert client.meta.region_name == "eu-west-1" and client.meta.endpoint_url == "http://127.0.0.1:9"
    assert settings.kms_client(access_key="c", secret_key="d", region="us-east-1").meta.region_name == "us-east-1"
