"""Drive the collection's modules through main() against a real local KMS on loopback.

Callers sign with the credentials the local KMS issued to their profile: "owner" is
arn:aws:iam::111122223333:role/owner, "enclave-host" the parent host's role.
"""

import json

import boto3
import pytest
from ansible.module_utils.testing import patch_module_args
from botocore.config import Config

from ansible_collections.confidential_ml.nitro.enclave_local.kms import LocalKms, LocalKmsServer


@pytest.fixture
def kms_server(tmp_path):
    with LocalKmsServer(LocalKms(tmp_path / "kms-state")) as server:
        yield server


def _client(server, principal):
    return boto3.client(
        "kms",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        **server.kms.credentials(principal),
        config=Config(retries={"max_attempts": 1}),
    )


@pytest.fixture
def kms_client(kms_server):
    """A boto3 KMS client for a principal (a profile of the local KMS's credentials)."""
    return lambda access_key: _client(kms_server, access_key)


@pytest.fixture
def owner(kms_client):
    return kms_client("owner")


@pytest.fixture
def key(owner):
    """A fresh key with KMS's default policy (the account root may do everything)."""
    return owner.create_key(Description="module tests")["KeyMetadata"]


@pytest.fixture
def connection(kms_server):
    """The modules' KMS options for the owner."""
    credentials = kms_server.kms.credentials("owner")
    return {
        "kms_endpoint_url": kms_server.endpoint_url,
        "region": "us-east-1",
        "access_key": credentials["aws_access_key_id"],
        "secret_key": credentials["aws_secret_access_key"],
    }


@pytest.fixture
def run_module(capsys):
    """Run a module's main() with args; returns its JSON result (with "failed" when it failed)."""

    def run(main, args, *, check_mode=False, diff=False):
        args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
        with patch_module_args(args), pytest.raises(SystemExit) as exited:
            main()
        result = json.loads(capsys.readouterr().out)
        assert (exited.value.code not in (0, None)) == bool(result.get("failed")), result
        return result

    return run
