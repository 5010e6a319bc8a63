"""host_kms_settings reads environment credentials without boto3 only where botocore would give the same answer.

Each case sets up an environment (and shared config files) and compares the environment reader with boto3's
own resolution in the same environment: where the reader answers, boto3 must answer the same; where boto3
would look further (profiles, files, expiring credentials) or fail, the reader must stand aside.
"""

import os

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import client
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError

KEYS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret/example"}


@pytest.fixture
def aws_env(tmp_path, monkeypatch):
    """Set exactly the AWS variables given (nothing from the test session), HOME without ~/.aws."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def setup(variables: dict) -> None:
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            monkeypatch.delenv(name)
        for name, value in variables.items():
            monkeypatch.setenv(name, value.format(tmp=tmp_path))

    return setup


# (variables, region argument): botocore takes these from the environment alone.
SAME = [
    ({**KEYS, "AWS_DEFAULT_REGION": "us-east-1"}, None),
    ({**KEYS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "session"}, None),
    ({**KEYS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_SECURITY_TOKEN": "older", "AWS_SESSION_TOKEN": "s"}, None),
    ({**KEYS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_SECURITY_TOKEN": "", "AWS_SESSION_TOKEN": "session"}, None),
    ({**KEYS, "AWS_DEFAULT_REGION": "us-east-1"}, "eu-west-1"),
    ({**KEYS, "AWS_DEFAULT_REGION": "us-east-1"}, ""),
    ({**KEYS, "AWS_REGION": "eu-north-1"}, None),  # botocore does not read AWS_REGION
    ({**KEYS, "AWS_DEFAULT_REGION": ""}, None),
    (KEYS, None),
    ({**KEYS, "AWS_CONFIG_FILE": "{tmp}/absent", "AWS_SHARED_CREDENTIALS_FILE": "{tmp}"}, "us-east-1"),  # a dir
]


@pytest.mark.parametrize(("variables", "region"), SAME)
def test_environment_credentials_match_botocore(aws_env, variables, region):
    aws_env(variables)
    fast = client._credentials_from_environment(region, None)
    assert fast is not None, "these credentials should be read without boto3"
    assert fast == client._credentials_from_boto3(region, None)


CONFIG = "[default]\nregion = eu-central-1\n[profile other]\nregion = ap-south-1\n"
# (variables, files to write, region argument, profile argument): botocore may answer otherwise, or fail.
ELSEWHERE = [
    ({**KEYS, "AWS_PROFILE": "missing"}, {}, "us-east-1", None),  # ProfileNotFound even with keys set
    ({**KEYS, "AWS_PROFILE": ""}, {}, "us-east-1", None),
    ({**KEYS, "AWS_DEFAULT_PROFILE": "other", "AWS_CONFIG_FILE": "{tmp}/config"}, {"config": CONFIG}, None, None),
    ({**KEYS, "AWS_CONFIG_FILE": "{tmp}/config"}, {"config": CONFIG}, None, None),  # the region comes from it
    ({**KEYS, "AWS_CONFIG_FILE": "{tmp}/config"}, {"config": "[default\nregion"}, "us-east-1", None),  # broken
    ({**KEYS, "AWS_SHARED_CREDENTIALS_FILE": "{tmp}/creds"}, {"creds": "[default\n"}, "us-east-1", None),
    (KEYS, {"home/.aws/config": CONFIG}, None, None),  # ~/.aws/config
    ({**KEYS, "AWS_CREDENTIAL_EXPIRATION": "2020-01-01T00:00:00Z"}, {}, "us-east-1", None),  # expired
    ({"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_DEFAULT_REGION": "us-east-1"}, {}, None, None),  # partial
    ({"AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}, {}, None, None),
    ({**KEYS, "AWS_DEFAULT_REGION": "us-east-1"}, {}, None, "named"),  # a named profile ignores the keys
]


def outcome(region, profile):
    try:
        return client.host_kms_settings(region=region, profile=profile)
    except Exception as err:  # noqa: BLE001 - whatever is raised must be the same either way
        return f"{type(err).__name__}: {err}"


@pytest.mark.parametrize(("variables", "files", "region", "profile"), ELSEWHERE)
def test_anything_else_is_left_to_boto3(aws_env, tmp_path, monkeypatch, variables, files, region, profile):
    aws_env(variables)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert client._credentials_from_environment(region, profile) is None
    answer = outcome(region, profile)
    monkeypatch.setattr(client, "_credentials_from_environment", lambda *args: None)
    assert answer == outcome(region, profile)


def test_host_kms_settings_from_the_environment(aws_env):
    aws_env({**KEYS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "session"})
    assert client.host_kms_settings() == {
        "region": "us-east-1",
        "aws_access_key_id": "AKIDEXAMPLE",
        "aws_secret_access_key": "secret/example",
        "aws_session_token": "session",
    }
    aws_env(KEYS)
    with pytest.raises(EnclaveError, match="no AWS region configured: pass --region or set AWS_DEFAULT_REGION"):
        client.host_kms_settings()
