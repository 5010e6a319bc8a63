"""The local KMS over real HTTP on loopback, driven by unmodified boto3 clients.

Two parties, each signing with the credentials the local KMS issued to its
profile: the owner (a key administrator) and the enclave's host (the user).
Attested requests carry documents from the simulated NSM, in the exact Nitro
format, signed by a local CA.
"""

import base64
import hashlib
import json
import logging
import os
import re
import stat
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from unittest import mock

import boto3
import pytest
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization

from ansible_collections.confidential_ml.nitro.enclave_local.kms import (
    CREDENTIALS_FILE,
    PRINCIPALS,
    STATE_FILE,
    LocalKms,
    LocalKmsServer,
    issue_credentials,
    load_credentials,
)
from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA, SimulatedNsm
from ansible_collections.confidential_ml.nitro.enclave_server import kms_recipient
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import KmsApiError, KmsError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import render_policy
from ansible_collections.confidential_ml.nitro.tests.vectors.shapes import aws_vector, ber_shape

ACCOUNT = "111122223333"
OWNER, USER = "owner", "enclave-host"
OWNER_ARN = f"arn:aws:iam::{ACCOUNT}:role/{OWNER}"
USER_ARN = f"arn:aws:iam::{ACCOUNT}:role/{USER}"
PCR0_GOOD = hashlib.sha384(b"the owner's image").digest()
PCR0_EVIL = hashlib.sha384(b"the host's own image").digest()
PCR8_OWNER = hashlib.sha384(b"the owner's signing certificate").digest()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def state(tmp_path):
    return tmp_path / "kms"


@pytest.fixture
def server(ca, state):
    with LocalKmsServer(LocalKms(state, trusted_roots=[ca.root_certificate])) as running:
        yield running


def client(server, principal, **config):
    """A boto3 client signing with the credentials the server issued to principal's profile."""
    return boto3.client(
        "kms",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        **server.kms.credentials(principal),
        config=Config(retries={"max_attempts": 1}, **config),
    )


@pytest.fixture
def owner(server):
    return client(server, OWNER)


@pytest.fixture
def user(server):
    return client(server, USER)


def error_code(caught) -> str:
    return caught.value.response["Error"]["Code"]


@pytest.fixture
def attested_key(owner):
    """A key whose policy, rendered by key_policy, releases it only to PCR0_GOOD, and a data key under it."""
    key_id = owner.create_key(Description="package key")["KeyMetadata"]["KeyId"]
    policy = render_policy(
        account_id=ACCOUNT, user_principals=[USER_ARN], admin_principals=[OWNER_ARN], pcr0=[PCR0_GOOD.hex()]
    )
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    data_key = owner.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext={"package": "app"})
    return key_id, data_key


# ---------------------------------------------------------------- keys, aliases, policies


def test_create_describe_alias_and_list(owner):
    created = owner.create_key(Description="models", Tags=[{"TagKey": "project", "TagValue": "ml"}])["KeyMetadata"]
    key_id = created["KeyId"]
    assert str(uuid.UUID(key_id)) == key_id
    assert created["Arn"] == f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id}"
    assert (created["Enabled"], created["KeyState"], created["KeySpec"], created["KeyUsage"]) == (
        True,
        "Enabled",
        "SYMMETRIC_DEFAULT",
        "ENCRYPT_DECRYPT",
    )
    assert created["Description"] == "models" and created["AWSAccountId"] == ACCOUNT

    owner.create_alias(AliasName="alias/models", TargetKeyId=key_id)
    for ref in (key_id, created["Arn"], "alias/models", f"arn:aws:kms:us-east-1:{ACCOUNT}:alias/models"):
        assert owner.describe_key(KeyId=ref)["KeyMetadata"]["KeyId"] == key_id, ref

    aliases = owner.list_aliases()["Aliases"]
    assert [(a["AliasName"], a["TargetKeyId"]) for a in aliases] == [("alias/models", key_id)]
    assert aliases[0]["AliasArn"] == f"arn:aws:kms:us-east-1:{ACCOUNT}:alias/models"
    other = owner.create_key()["KeyMetadata"]["KeyId"]
    assert owner.list_aliases(KeyId=other)["Aliases"] == []
    assert {k["KeyId"] for k in owner.list_keys()["Keys"]} == {key_id, other}

    with pytest.raises(owner.exceptions.AlreadyExistsException):
        owner.create_alias(AliasName="alias/models", TargetKeyId=other)
    with pytest.raises(owner.exceptions.InvalidAliasNameException):
        owner.create_alias(AliasName="models", TargetKeyId=other)
    owner.update_alias(AliasName="alias/models", TargetKeyId=other)
    assert owner.describe_key(KeyId="alias/models")["KeyMetadata"]["KeyId"] == other
    owner.delete_alias(AliasName="alias/models")
    with pytest.raises(owner.exceptions.NotFoundException):
        owner.describe_key(KeyId="alias/models")


def test_pagination(owner):
    made = {owner.create_key()["KeyMetadata"]["KeyId"] for _i in range(5)}
    page = owner.list_keys(Limit=2)
    assert page["Truncated"] and len(page["Keys"]) == 2
    seen = [k["KeyId"] for k in page["Keys"]]
    while page["Truncated"]:
        page = owner.list_keys(Limit=2, Marker=page["NextMarker"])
        seen += [k["KeyId"] for k in page["Keys"]]
    assert sorted(seen) == sorted(made)
    assert [k["KeyId"] for p in owner.get_paginator("list_keys").paginate(Limit=2) for k in p["Keys"]] == seen


@pytest.mark.parametrize(
    "ref",
    [str(uuid.uuid4()), "alias/missing", f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/{uuid.uuid4()}", "not-a-key"],
    ids=["unknown-id", "unknown-alias", "other-region", "garbage"],
)
def test_unknown_key_is_not_found(owner, ref):
    with pytest.raises(owner.exceptions.NotFoundException) as caught:
        owner.describe_key(KeyId=ref)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(owner.exceptions.NotFoundException):
        owner.encrypt(KeyId=ref, Plaintext=b"x")


def test_default_policy_and_put_policy(owner):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    got = owner.get_key_policy(KeyId=key_id, PolicyName="default")
    default = json.loads(got["Policy"])
    assert default["Statement"] == [
        {
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
            "Action": "kms:*",
            "Resource": "*",
        }
    ]
    policy = json.dumps(
        render_policy(
            account_id=ACCOUNT, user_principals=[USER_ARN], admin_principals=[OWNER_ARN], pcr0=[PCR0_GOOD.hex()]
        )
    )
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy)
    assert owner.get_key_policy(KeyId=key_id)["Policy"] == policy


@pytest.mark.parametrize(
    "policy",
    [
        "not json",
        "[]",
        json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*"}]}),
        json.dumps({"Statement": [{"Effect": "Maybe", "Principal": "*", "Action": "kms:*", "Resource": "*"}]}),
    ],
    ids=["text", "array", "no-resource", "bad-effect"],
)
def test_malformed_policy_is_refused(owner, policy):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(owner.exceptions.MalformedPolicyDocumentException):
        owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy)
    with pytest.raises(owner.exceptions.MalformedPolicyDocumentException):
        owner.create_key(Policy=policy)
    assert json.loads(owner.get_key_policy(KeyId=key_id)["Policy"])["Id"] == "key-default-1"


def test_policy_that_locks_out_its_author_needs_the_bypass_flag(owner):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    others_only = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": USER_ARN}, "Action": "kms:*", "Resource": "*"},
            ],
        }
    )
    with pytest.raises(owner.exceptions.MalformedPolicyDocumentException) as caught:
        owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=others_only)
    assert "will not allow you to update the key policy" in str(caught.value)
    with pytest.raises(owner.exceptions.MalformedPolicyDocumentException):
        owner.create_key(Policy=others_only)

    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=others_only, BypassPolicyLockoutSafetyCheck=True)
    with pytest.raises(ClientError) as denied:
        owner.get_key_policy(KeyId=key_id)
    assert error_code(denied) == "AccessDeniedException"


def test_key_policy_governs_every_operation(owner, user, attested_key):
    key_id, _data_key = attested_key
    owner.describe_key(KeyId=key_id)
    owner.encrypt(KeyId=key_id, Plaintext=b"owner may encrypt")  # the admin statement grants kms:*
    for call in (
        lambda: user.describe_key(KeyId=key_id),
        lambda: user.get_key_policy(KeyId=key_id),
        lambda: user.encrypt(KeyId=key_id, Plaintext=b"x"),
        lambda: user.generate_data_key(KeyId=key_id, KeySpec="AES_256"),
        lambda: user.create_alias(AliasName="alias/mine", TargetKeyId=key_id),
    ):
        with pytest.raises(ClientError) as caught:
            call()
        assert error_code(caught) == "AccessDeniedException"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert USER_ARN in caught.value.response["Error"]["Message"]


def test_credentials_profile_may_name_another_principal(ca, state):
    """A profile named after a role is that role; principal_arn names any other principal."""
    path = issue_credentials(state, principals=("owner", "auditor"))
    with path.open("a") as out:
        out.write(f"principal_arn = arn:aws:iam::{ACCOUNT}:user/alice\n")  # appended to [auditor]
    with LocalKmsServer(LocalKms(state, trusted_roots=[ca.root_certificate])) as running:
        admin = client(running, OWNER)
        key_id = admin.create_key()["KeyMetadata"]["KeyId"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": OWNER_ARN}, "Action": "kms:*", "Resource": "*"}],
        }
        admin.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
        admin.describe_key(KeyId=key_id)
        with pytest.raises(ClientError) as caught:
            client(running, "auditor").describe_key(KeyId=key_id)
        assert f"arn:aws:iam::{ACCOUNT}:user/alice is not authorized" in caught.value.response["Error"]["Message"]


# ---------------------------------------------------------------- authentication (SigV4, as AWS checks it)


def test_credentials_file_is_private_and_a_shared_credentials_file(server, state, monkeypatch):
    path = state / CREDENTIALS_FILE
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    profiles = load_credentials(path)
    assert sorted(profiles) == sorted(PRINCIPALS)
    keys = [p["aws_access_key_id"] for p in profiles.values()]
    secrets = [p["aws_secret_access_key"] for p in profiles.values()]
    assert len(set(keys)) == len(set(secrets)) == len(PRINCIPALS)
    assert all(len(k) == 20 and k.startswith("AKIA") for k in keys) and all(len(s) == 40 for s in secrets)
    # boto3 reads it as it is: AWS_SHARED_CREDENTIALS_FILE + a profile, nothing else configured.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(state / "no-config"))
    session = boto3.Session(profile_name="enclave-host", region_name="us-east-1")
    kms = session.client("kms", endpoint_url=server.endpoint_url)
    owner = client(server, OWNER)
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": OWNER_ARN}, "Action": "kms:*", "Resource": "*"}],
    }
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    with pytest.raises(ClientError) as caught:
        kms.describe_key(KeyId=key_id)
    assert f"User: {USER_ARN} is not authorized" in caught.value.response["Error"]["Message"]  # the host's profile
    # A second start keeps the issued credentials (the users' profiles go on working).
    LocalKms(state, trusted_roots=[])
    assert load_credentials(path) == profiles


def forged(server, principal, **overrides):
    """A client for principal whose credentials are changed by overrides."""
    credentials = {**server.kms.credentials(principal), **overrides}
    return boto3.client(
        "kms",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        **credentials,
        config=Config(retries={"max_attempts": 1}),
    )


def test_wrong_secret_is_an_invalid_signature(server):
    """The attack this closes: a local user naming the owner's access key id (or the old label "owner")."""
    other_secret = server.kms.credentials(USER)["aws_secret_access_key"]
    for secret in (other_secret, "x", ""):
        with pytest.raises(ClientError) as caught:
            forged(server, OWNER, aws_secret_access_key=secret).list_keys()
        assert error_code(caught) == "InvalidSignatureException"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


@pytest.mark.parametrize("access_key", ["owner", "AKIAIOSFODNN7EXAMPLE", "enclave-host"])
def test_unknown_access_key_is_unrecognized(server, access_key):
    kms = forged(server, OWNER, aws_access_key_id=access_key)
    with pytest.raises(ClientError) as caught:
        kms.list_keys()
    assert error_code(caught) == "UnrecognizedClientException"


def test_session_token_is_unrecognized(server):
    """The local KMS issues no session tokens: a request that carries one was not made with its credentials."""
    with pytest.raises(ClientError) as caught:
        forged(server, OWNER, aws_session_token="FwoGZXIvYXdzEXAMPLE").list_keys()
    assert error_code(caught) == "UnrecognizedClientException"


def signed_request(server, principal, target, body: bytes, *, when=None, region="us-east-1"):
    """(headers, body) of a request signed by botocore's SigV4 signer as boto3 signs it, at time when."""
    request = AWSRequest(
        method="POST",
        url=server.endpoint_url + "/",
        data=body,
        headers={"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1"},
    )
    credentials = server.kms.credentials(principal)
    signer = SigV4Auth(
        Credentials(credentials["aws_access_key_id"], credentials["aws_secret_access_key"]), "kms", region
    )
    if when is None:
        signer.add_auth(request)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
            signer.add_auth(request)
    return dict(request.headers.items()), body


def post(server, headers, body):
    """Send raw bytes with raw headers; (status, Content-Type, decoded JSON body)."""
    request = urllib.request.Request(server.endpoint_url + "/", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:  # noqa: S310 - loopback test server
            return response.status, response.headers["Content-Type"], json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], json.loads(err.read())


def test_signed_raw_request_is_accepted_and_a_tampered_body_is_not(server):
    body = json.dumps({"NumberOfBytes": 8}).encode()
    headers, body = signed_request(server, OWNER, "TrentService.GenerateRandom", body)
    status, _type, answer = post(server, headers, body)
    assert status == 200 and len(base64.b64decode(answer["Plaintext"])) == 8
    # The same signature over another body (same length, so only the payload hash can tell):
    status, _type, answer = post(server, headers, json.dumps({"NumberOfBytes": 9}).encode())
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    # ...or another operation, or another host:
    status, _type, answer = post(server, {**headers, "X-Amz-Target": "TrentService.ListKeys"}, body)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    status, _type, answer = post(server, {**headers, "Host": "kms.us-east-1.amazonaws.com"}, body)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")


@pytest.mark.parametrize(("minutes", "accepted"), [(-6, False), (-4, True), (4, True), (6, False), (-60 * 24, False)])
def test_stale_or_future_date_is_refused(server, minutes, accepted):
    """AWS allows 5 minutes between X-Amz-Date and its clock, and answers InvalidSignatureException beyond."""
    when = datetime.now(UTC) + timedelta(minutes=minutes)
    headers, body = signed_request(server, OWNER, "TrentService.ListKeys", b"{}", when=when)
    status, _type, answer = post(server, headers, body)
    if accepted:
        assert status == 200 and "Keys" in answer
    else:
        assert (status, answer["__type"]) == (400, "InvalidSignatureException")
        expected = (
            "Signature expired: .* is now earlier" if minutes < 0 else "Signature not yet current: .* is still later"
        )
        assert re.match(expected, answer["message"]), answer["message"]


def test_signature_scoped_to_another_region_or_unsigned_target_is_refused(server):
    headers, body = signed_request(server, OWNER, "TrentService.ListKeys", b"{}", region="eu-west-1")
    status, _type, answer = post(server, headers, body)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    headers, body = signed_request(server, OWNER, "TrentService.ListKeys", b"{}")
    headers["Authorization"] = headers["Authorization"].replace("x-amz-target", "x-amz-targets")
    status, _type, answer = post(server, headers, body)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    status, _type, answer = post(server, {**headers, "Authorization": "AWS4-HMAC-SHA256 Credential=owner/x"}, body)
    assert (status, answer["__type"]) == (400, "IncompleteSignatureException")


def test_unsigned_request_is_refused(server):
    anonymous = client(server, OWNER, signature_version=UNSIGNED)
    with pytest.raises(ClientError) as caught:
        anonymous.list_keys()
    assert error_code(caught) == "MissingAuthenticationTokenException"


def test_disable_enable_and_schedule_deletion(owner):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    blob = owner.encrypt(KeyId=key_id, Plaintext=b"kept")["CiphertextBlob"]
    owner.disable_key(KeyId=key_id)
    assert owner.describe_key(KeyId=key_id)["KeyMetadata"]["Enabled"] is False
    with pytest.raises(owner.exceptions.DisabledException):
        owner.decrypt(CiphertextBlob=blob)
    owner.enable_key(KeyId=key_id)
    assert owner.decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept"
    scheduled = owner.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    assert scheduled["KeyState"] == "PendingDeletion"
    with pytest.raises(owner.exceptions.KMSInvalidStateException):
        owner.decrypt(CiphertextBlob=blob)
    owner.cancel_key_deletion(KeyId=key_id)
    assert owner.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"


def test_unsupported_operations_and_key_types(owner):
    with pytest.raises(owner.exceptions.UnsupportedOperationException):
        owner.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    blob = owner.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(owner.exceptions.UnsupportedOperationException):
        owner.re_encrypt(CiphertextBlob=blob, DestinationKeyId=key_id)


def test_raw_http_protocol(server):
    """What boto3 relies on, seen on the wire: the JSON 1.1 content type and __type error bodies."""

    def call(target, payload):
        return post(server, *signed_request(server, OWNER, target, json.dumps(payload).encode()))

    status, content_type, body = call("TrentService.GenerateRandom", {"NumberOfBytes": 8})
    assert (status, content_type) == (200, "application/x-amz-json-1.1")
    assert len(base64.b64decode(body["Plaintext"])) == 8
    status, _headers, body = call("TrentService.NoSuchThing", {})
    assert status == 400 and body["__type"] == "UnsupportedOperationException"
    status, _headers, body = call("TrentService.GenerateRandom", {"NumberOfBytes": 5000})
    assert status == 400 and body["__type"] == "ValidationException"


def test_loopback_only(ca, state):
    kms = LocalKms(state, trusted_roots=[ca.root_certificate])
    for host in ("0.0.0.0", "192.0.2.10", "kms.example.com", "::"):
        with pytest.raises(ValueError, match="loopback"):
            LocalKmsServer(kms, host=host)


def test_handle_without_http(ca, state):
    kms = LocalKms(state, trusted_roots=[ca.root_certificate])
    key = kms.handle("CreateKey", {}, principal=OWNER_ARN)["KeyMetadata"]
    with pytest.raises(KmsApiError) as caught:
        kms.handle("Encrypt", {"KeyId": key["KeyId"], "Plaintext": "!!"}, principal=OWNER_ARN)
    assert (caught.value.code, caught.value.status) == ("ValidationException", 400)
    with pytest.raises(KmsApiError) as caught:
        kms.handle("Frobnicate", {}, principal=OWNER_ARN)
    assert caught.value.code == "UnsupportedOperationException"


# ---------------------------------------------------------------- key management (what amazon.aws.kms_key calls)


def unchecked(server, access_key=OWNER):
    """A client that sends what it is given, so that the server's own checks are the ones tested."""
    return client(server, access_key, parameter_validation=False)


def tags_of(kms, key_id) -> dict:
    pages = kms.get_paginator("list_resource_tags").paginate(KeyId=key_id)
    return {t["TagKey"]: t["TagValue"] for t in pages.build_full_result()["Tags"]}


def test_tags_add_replace_remove_and_page(owner):
    key_id = owner.create_key(Tags=[{"TagKey": "project", "TagValue": "ml"}])["KeyMetadata"]["KeyId"]
    listed = owner.list_resource_tags(KeyId=key_id)
    assert (listed["Tags"], listed["Truncated"]) == ([{"TagKey": "project", "TagValue": "ml"}], False)
    assert "NextMarker" not in listed
    owner.tag_resource(
        KeyId=f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id}",
        Tags=[{"TagKey": "project", "TagValue": "vision"}, {"TagKey": "stage", "TagValue": ""}],
    )
    assert tags_of(owner, key_id) == {"project": "vision", "stage": ""}
    owner.untag_resource(KeyId=key_id, TagKeys=["stage", "never-set"])  # an absent key is no error, as in AWS
    assert tags_of(owner, key_id) == {"project": "vision"}

    owner.tag_resource(KeyId=key_id, Tags=[{"TagKey": f"t{i}", "TagValue": str(i)} for i in range(4)])
    first = owner.list_resource_tags(KeyId=key_id, Limit=2)
    assert first["Truncated"] and len(first["Tags"]) == 2 and first["NextMarker"]
    rest = owner.list_resource_tags(KeyId=key_id, Limit=10, Marker=first["NextMarker"])
    assert not rest["Truncated"] and "NextMarker" not in rest
    assert [t["TagKey"] for t in first["Tags"] + rest["Tags"]] == ["project", "t0", "t1", "t2", "t3"]
    with pytest.raises(owner.exceptions.InvalidMarkerException):
        owner.list_resource_tags(KeyId=key_id, Marker="not-ours")


@pytest.mark.parametrize(
    ("tags", "code"),
    [
        ([{"TagKey": "aws:owner", "TagValue": "x"}], "TagException"),
        ([{"TagKey": "", "TagValue": "x"}], "TagException"),
        ([{"TagKey": "k" * 129, "TagValue": "x"}], "TagException"),
        ([{"TagKey": "k", "TagValue": "v" * 257}], "TagException"),
        ([{"TagKey": "k"}], "TagException"),
        ([{"TagKey": "k", "TagValue": "1"}, {"TagKey": "k", "TagValue": "2"}], "TagException"),
        ([{"TagKey": f"k{i}", "TagValue": ""} for i in range(51)], "LimitExceededException"),
    ],
    ids=["aws-prefix", "empty-key", "long-key", "long-value", "no-value", "twice", "too-many"],
)
def test_bad_tags_are_refused(server, tags, code):
    kms = unchecked(server)
    key_id = kms.create_key(Tags=[{"TagKey": "kept", "TagValue": "yes"}])["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as caught:
        kms.tag_resource(KeyId=key_id, Tags=tags)
    assert error_code(caught) == code
    with pytest.raises(ClientError) as caught:
        kms.create_key(Tags=tags)
    assert error_code(caught) == code
    assert tags_of(kms, key_id) == {"kept": "yes"}
    assert len(kms.list_keys()["Keys"]) == 1  # the refused CreateKey made no key


def test_tag_quota_counts_the_tags_a_key_already_has(owner):
    key_id = owner.create_key(Tags=[{"TagKey": f"k{i}", "TagValue": ""} for i in range(50)])["KeyMetadata"]["KeyId"]
    owner.tag_resource(KeyId=key_id, Tags=[{"TagKey": "k0", "TagValue": "replaced"}])  # still 50
    with pytest.raises(owner.exceptions.LimitExceededException) as caught:
        owner.tag_resource(KeyId=key_id, Tags=[{"TagKey": "one-more", "TagValue": ""}])
    assert "remove some first" in str(caught.value)
    assert len(tags_of(owner, key_id)) == 50 and tags_of(owner, key_id)["k0"] == "replaced"


def test_update_key_description(server, owner):
    key_id = owner.create_key(Description="first")["KeyMetadata"]["KeyId"]
    owner.update_key_description(KeyId=key_id, Description="second")
    assert owner.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "second"
    owner.update_key_description(KeyId=key_id, Description="")  # AWS allows an empty description
    assert owner.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == ""
    assert owner.create_key(Description="")["KeyMetadata"]["Description"] == ""
    kms = unchecked(server)
    for bad in ({"Description": "d" * 8193}, {"Description": None}, {"Description": 7}):
        with pytest.raises(ClientError) as caught:
            kms.update_key_description(KeyId=key_id, **bad)
        assert error_code(caught) == "ValidationException", bad
    assert owner.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == ""


def test_key_rotation_flag_and_period(server, owner):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    arn = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id}"
    status = owner.get_key_rotation_status(KeyId=key_id)
    assert (status["KeyRotationEnabled"], status["KeyId"]) == (False, arn)
    assert "RotationPeriodInDays" not in status and "NextRotationDate" not in status

    before = time.time()
    owner.enable_key_rotation(KeyId=key_id)
    status = owner.get_key_rotation_status(KeyId=key_id)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 365
    assert before + 365 * 86400 - 5 <= status["NextRotationDate"].timestamp() <= time.time() + 365 * 86400 + 5
    owner.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=90)
    assert owner.get_key_rotation_status(KeyId=key_id)["RotationPeriodInDays"] == 90
    kms = unchecked(server)
    for bad in (89, 2561):
        with pytest.raises(ClientError) as caught:
            kms.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=bad)
        assert error_code(caught) == "ValidationException"
    assert owner.get_key_rotation_status(KeyId=key_id)["RotationPeriodInDays"] == 90

    owner.disable_key_rotation(KeyId=key_id)
    assert owner.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False
    owner.disable_key_rotation(KeyId=key_id)  # already off: no error


def test_rotation_and_key_states(owner):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    owner.enable_key_rotation(KeyId=key_id)
    owner.disable_key(KeyId=key_id)
    for call in (owner.enable_key_rotation, owner.disable_key_rotation):
        with pytest.raises(owner.exceptions.DisabledException) as caught:
            call(KeyId=key_id)
        assert "enable it (EnableKey) first" in str(caught.value)
    assert owner.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is True  # kept while disabled

    owner.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    assert owner.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False  # as AWS reports it
    with pytest.raises(owner.exceptions.KMSInvalidStateException):
        owner.disable_key_rotation(KeyId=key_id)
    owner.cancel_key_deletion(KeyId=key_id)
    assert owner.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is True  # and back after cancelling


def test_pending_deletion_refuses_changes_but_not_reads(owner):
    key_id = owner.create_key(Description="doomed", Tags=[{"TagKey": "a", "TagValue": "b"}])["KeyMetadata"]["KeyId"]
    owner.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    for call in (
        lambda: owner.tag_resource(KeyId=key_id, Tags=[{"TagKey": "c", "TagValue": "d"}]),
        lambda: owner.untag_resource(KeyId=key_id, TagKeys=["a"]),
        lambda: owner.update_key_description(KeyId=key_id, Description="saved"),
        lambda: owner.enable_key_rotation(KeyId=key_id),
        lambda: owner.create_alias(AliasName="alias/doomed", TargetKeyId=key_id),
    ):
        with pytest.raises(owner.exceptions.KMSInvalidStateException) as caught:
            call()
        assert "cancel the deletion (CancelKeyDeletion) first" in str(caught.value)
    # What amazon.aws.kms_key reads after scheduling the deletion still answers.
    assert owner.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "doomed"
    assert tags_of(owner, key_id) == {"a": "b"}
    assert owner.list_key_policies(KeyId=key_id)["PolicyNames"] == ["default"]
    assert owner.list_grants(KeyId=key_id)["Grants"] == []
    assert owner.list_aliases(KeyId=key_id)["Aliases"] == []


def test_list_key_policies(owner):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    listed = owner.list_key_policies(KeyId=key_id)
    assert (listed["PolicyNames"], listed["Truncated"]) == (["default"], False)
    pages = owner.get_paginator("list_key_policies").paginate(KeyId=key_id, PaginationConfig={"PageSize": 1})
    assert pages.build_full_result()["PolicyNames"] == ["default"]
    with pytest.raises(owner.exceptions.NotFoundException):
        owner.list_key_policies(KeyId=str(uuid.uuid4()))


def test_grants_are_listed_empty_and_refused(owner):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    listed = owner.list_grants(KeyId=key_id)
    assert (listed["Grants"], listed["Truncated"]) == ([], False)
    assert owner.get_paginator("list_grants").paginate(KeyId=key_id).build_full_result()["Grants"] == []
    assert owner.list_grants(KeyId=key_id, GranteePrincipal=USER_ARN)["Grants"] == []
    assert owner.list_retirable_grants(RetiringPrincipal=OWNER_ARN)["Grants"] == []
    with pytest.raises(owner.exceptions.NotFoundException):
        owner.list_grants(KeyId=str(uuid.uuid4()))
    for call in (
        lambda: owner.create_grant(KeyId=key_id, GranteePrincipal=USER_ARN, Operations=["Decrypt"]),
        lambda: owner.retire_grant(KeyId=key_id, GrantId="0" * 64),
        lambda: owner.revoke_grant(KeyId=key_id, GrantId="0" * 64),
    ):
        with pytest.raises(owner.exceptions.UnsupportedOperationException) as caught:
            call()
        assert "does not implement grants" in str(caught.value) and "key policy" in str(caught.value)
    assert owner.list_grants(KeyId=key_id)["Grants"] == []


def test_key_management_is_governed_by_the_key_policy(owner, user):
    """Each new operation asks the key policy for its own kms: action, and a refusal changes nothing."""
    key_id = owner.create_key(Description="kept", Tags=[{"TagKey": "a", "TagValue": "b"}])["KeyMetadata"]["KeyId"]
    reader = {
        "Sid": "UserMayListTags",
        "Effect": "Allow",
        "Principal": {"AWS": USER_ARN},
        "Action": "kms:ListResourceTags",
        "Resource": "*",
    }
    policy = render_policy(
        account_id=ACCOUNT, user_principals=[USER_ARN], admin_principals=[OWNER_ARN], pcr0=[PCR0_GOOD.hex()]
    )
    policy["Statement"].append(reader)
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))

    assert tags_of(user, key_id) == {"a": "b"}
    denied = {
        "kms:TagResource": lambda: user.tag_resource(KeyId=key_id, Tags=[{"TagKey": "a", "TagValue": "evil"}]),
        "kms:UntagResource": lambda: user.untag_resource(KeyId=key_id, TagKeys=["a"]),
        "kms:UpdateKeyDescription": lambda: user.update_key_description(KeyId=key_id, Description="evil"),
        "kms:GetKeyRotationStatus": lambda: user.get_key_rotation_status(KeyId=key_id),
        "kms:EnableKeyRotation": lambda: user.enable_key_rotation(KeyId=key_id),
        "kms:DisableKeyRotation": lambda: user.disable_key_rotation(KeyId=key_id),
        "kms:ListKeyPolicies": lambda: user.list_key_policies(KeyId=key_id),
        "kms:ListGrants": lambda: user.list_grants(KeyId=key_id),
    }
    for action, call in denied.items():
        with pytest.raises(ClientError) as caught:
            call()
        assert error_code(caught) == "AccessDeniedException", action
        assert f"{USER_ARN} is not authorized to perform: {action}" in caught.value.response["Error"]["Message"]
    assert tags_of(owner, key_id) == {"a": "b"}
    assert owner.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "kept"
    assert owner.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False


def test_tags_are_condition_keys(owner, user):
    """aws:ResourceTag/* on every key operation, aws:RequestTag/* and aws:TagKeys on tagging, as in AWS."""
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": OWNER_ARN}, "Action": "kms:*", "Resource": "*"},
            {
                "Sid": "TeamMayEncrypt",
                "Effect": "Allow",
                "Principal": {"AWS": USER_ARN},
                "Action": "kms:Encrypt",
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:ResourceTag/team": "ml"}},
            },
            {
                "Sid": "NobodyMarksKeysPublic",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "kms:TagResource",
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:RequestTag/visibility": "public"}},
            },
            {
                "Sid": "TeamTagStays",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "kms:UntagResource",
                "Resource": "*",
                "Condition": {"ForAnyValue:StringEquals": {"aws:TagKeys": "team"}},
            },
        ],
    }
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    with pytest.raises(ClientError) as caught:
        user.encrypt(KeyId=key_id, Plaintext=b"x")
    assert error_code(caught) == "AccessDeniedException"
    owner.tag_resource(KeyId=key_id, Tags=[{"TagKey": "team", "TagValue": "ml"}])
    user.encrypt(KeyId=key_id, Plaintext=b"now allowed by the tag")

    for call in (
        lambda: owner.tag_resource(KeyId=key_id, Tags=[{"TagKey": "visibility", "TagValue": "public"}]),
        lambda: owner.untag_resource(KeyId=key_id, TagKeys=["other", "team"]),
    ):
        with pytest.raises(ClientError) as caught:
            call()
        assert error_code(caught) == "AccessDeniedException"
        assert "explicit deny" in caught.value.response["Error"]["Message"]
    owner.tag_resource(KeyId=key_id, Tags=[{"TagKey": "visibility", "TagValue": "internal"}])
    assert tags_of(owner, key_id) == {"team": "ml", "visibility": "internal"}


def test_key_management_state_survives_restart(ca, state):
    with LocalKmsServer(LocalKms(state, trusted_roots=[ca.root_certificate])) as first:
        kms = client(first, OWNER)
        key_id = kms.create_key(Tags=[{"TagKey": "a", "TagValue": "b"}])["KeyMetadata"]["KeyId"]
        kms.tag_resource(KeyId=key_id, Tags=[{"TagKey": "c", "TagValue": "d"}])
        kms.update_key_description(KeyId=key_id, Description="described")
        kms.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=180)
        next_rotation = kms.get_key_rotation_status(KeyId=key_id)["NextRotationDate"]

    with LocalKmsServer(LocalKms(state, trusted_roots=[ca.root_certificate])) as second:
        kms = client(second, OWNER)
        assert tags_of(kms, key_id) == {"a": "b", "c": "d"}
        assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "described"
        status = kms.get_key_rotation_status(KeyId=key_id)
        assert (status["KeyRotationEnabled"], status["RotationPeriodInDays"]) == (True, 180)
        assert status["NextRotationDate"] == next_rotation


# ---------------------------------------------------------------- encryption


def test_encrypt_decrypt_with_encryption_context(owner):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    context = {"package": "app", "version": "1.0"}
    sealed = owner.encrypt(KeyId=key_id, Plaintext=b"model weights key", EncryptionContext=context)
    assert sealed["KeyId"].endswith(key_id)
    opened = owner.decrypt(CiphertextBlob=sealed["CiphertextBlob"], EncryptionContext=dict(reversed(context.items())))
    assert opened["Plaintext"] == b"model weights key" and opened["KeyId"] == sealed["KeyId"]
    assert "CiphertextForRecipient" not in opened

    for wrong in ({"package": "app"}, {**context, "version": "2.0"}, {}):
        with pytest.raises(owner.exceptions.InvalidCiphertextException):
            owner.decrypt(CiphertextBlob=sealed["CiphertextBlob"], EncryptionContext=wrong)


def test_edited_or_foreign_blobs_are_invalid(owner):
    key_a = owner.create_key()["KeyMetadata"]["KeyId"]
    key_b = owner.create_key()["KeyMetadata"]["KeyId"]
    blob = owner.encrypt(KeyId=key_a, Plaintext=b"secret")["CiphertextBlob"]

    edited = bytearray(blob)
    edited[-1] ^= 1
    relabelled = blob[:1] + uuid.UUID(key_b).bytes + blob[17:]  # the same sealed bytes, claimed by key B
    for bad in (bytes(edited), relabelled, blob[:20], b"\x07" + blob[1:]):
        with pytest.raises(owner.exceptions.InvalidCiphertextException):
            owner.decrypt(CiphertextBlob=bad)
    with pytest.raises(owner.exceptions.IncorrectKeyException):
        owner.decrypt(CiphertextBlob=blob, KeyId=key_b)
    assert owner.decrypt(CiphertextBlob=blob, KeyId=key_a)["Plaintext"] == b"secret"


def test_generate_data_key_and_random(server, owner):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    for kwargs, size in (({"KeySpec": "AES_256"}, 32), ({"KeySpec": "AES_128"}, 16), ({"NumberOfBytes": 24}, 24)):
        made = owner.generate_data_key(KeyId=key_id, EncryptionContext={"k": "v"}, **kwargs)
        assert len(made["Plaintext"]) == size and made["KeyId"].endswith(key_id)
        again = owner.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext={"k": "v"})
        assert again["Plaintext"] == made["Plaintext"]
    with pytest.raises(ClientError) as caught:
        owner.generate_data_key(KeyId=key_id)
    assert error_code(caught) == "ValidationException"

    assert len(owner.generate_random(NumberOfBytes=1)["Plaintext"]) == 1
    first, second = (owner.generate_random(NumberOfBytes=1024)["Plaintext"] for _i in range(2))
    assert len(first) == 1024 and first != second
    unchecked = client(server, OWNER, parameter_validation=False)  # let the server do the checking
    for bad in (0, 1025):
        with pytest.raises(ClientError) as caught:
            unchecked.generate_random(NumberOfBytes=bad)
        assert error_code(caught) == "ValidationException"


# ---------------------------------------------------------------- persistence


def test_state_survives_restart_and_is_private(ca, state):
    with LocalKmsServer(LocalKms(state, trusted_roots=[ca.root_certificate])) as first:
        kms = client(first, OWNER)
        key_id = kms.create_key(Description="durable")["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName="alias/durable", TargetKeyId=key_id)
        blob = kms.encrypt(KeyId="alias/durable", Plaintext=b"still here", EncryptionContext={"a": "b"})

    with LocalKmsServer(LocalKms(state, trusted_roots=[ca.root_certificate])) as second:
        kms = client(second, OWNER)
        opened = kms.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"a": "b"})
        assert opened["Plaintext"] == b"still here"
        assert kms.describe_key(KeyId="alias/durable")["KeyMetadata"]["Description"] == "durable"

    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / STATE_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state / CREDENTIALS_FILE).st_mode) == 0o600
    assert sorted(p.name for p in state.iterdir()) == sorted([STATE_FILE, CREDENTIALS_FILE])  # no temporary files


# ---------------------------------------------------------------- attested requests


def nsm(ca, pcr0, **pcrs):
    return SimulatedNsm(ca, {0: pcr0, **{int(k[3:]): v for k, v in pcrs.items()}})


def test_attested_enclave_gets_the_key(ca, user, attested_key):
    key_id, data_key = attested_key
    released = kms_recipient.decrypt(
        user, nsm(ca, PCR0_GOOD), data_key["CiphertextBlob"], encryption_context={"package": "app"}, key_id=key_id
    )
    assert released == data_key["Plaintext"]


def test_attested_answer_has_no_plaintext(ca, user, attested_key):
    _key_id, data_key = attested_key
    recipient = kms_recipient.Recipient()
    document = nsm(ca, PCR0_GOOD).attest(public_key=recipient.public_key_der)
    answer = user.decrypt(
        CiphertextBlob=data_key["CiphertextBlob"],
        EncryptionContext={"package": "app"},
        Recipient=recipient.parameter(document),
    )
    assert "Plaintext" not in answer
    assert recipient.unwrap(answer["CiphertextForRecipient"]) == data_key["Plaintext"]
    assert kms_recipient.Recipient().public_key_der != recipient.public_key_der
    with pytest.raises(KmsError, match="another key"):
        kms_recipient.Recipient().unwrap(answer["CiphertextForRecipient"])


def test_attested_answer_has_the_shape_of_a_real_aws_answer(ca, user, attested_key):
    """What the local KMS sends over HTTP is, TLV by TLV, what AWS KMS sent in tests/vectors/aws
    (for the same RSA-2048 key and a 32-byte data key)."""
    _key_id, data_key = attested_key
    real_key = serialization.load_pem_private_key(aws_vector("kms-ciphertext-for-recipient.key.pem"), None)
    recipient = kms_recipient.Recipient(real_key)
    answer = user.decrypt(
        CiphertextBlob=data_key["CiphertextBlob"],
        EncryptionContext={"package": "app"},
        Recipient=recipient.parameter(nsm(ca, PCR0_GOOD).attest(public_key=recipient.public_key_der)),
    )
    assert ber_shape(answer["CiphertextForRecipient"]) == ber_shape(aws_vector("kms-ciphertext-for-recipient.b64"))
    assert recipient.unwrap(answer["CiphertextForRecipient"]) == data_key["Plaintext"]


def test_other_measurement_is_access_denied(ca, user, attested_key, caplog):
    key_id, data_key = attested_key
    caplog.set_level(logging.INFO, logger="ansible_collections.confidential_ml.nitro.enclave_local.kms")
    with pytest.raises(KmsError) as caught:
        kms_recipient.decrypt(
            user, nsm(ca, PCR0_EVIL), data_key["CiphertextBlob"], encryption_context={"package": "app"}, key_id=key_id
        )
    assert caught.value.code == "AccessDeniedException"
    assert isinstance(caught.value.__cause__, ClientError)
    assert caught.value.__cause__.response["Error"]["Code"] == "AccessDeniedException"
    assert PCR0_EVIL.hex() in str(caught.value) and "ask the key owner" in str(caught.value)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Decrypt by")]
    assert any(USER_ARN in m and key_id in m and PCR0_EVIL.hex() in m and "deny" in m for m in logged), logged


@pytest.mark.parametrize("party", [USER, OWNER, "admin"])
def test_plain_decrypt_is_denied_to_everyone(server, attested_key, party):
    _key_id, data_key = attested_key
    with pytest.raises(ClientError) as caught:
        client(server, party).decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext={"package": "app"})
    assert error_code(caught) == "AccessDeniedException"


def test_debug_mode_enclave_is_denied_by_the_policy(ca, user, attested_key):
    _key_id, data_key = attested_key
    debug = SimulatedNsm(ca, {0: PCR0_GOOD}, debug=True)
    with pytest.raises(KmsError) as caught:
        kms_recipient.decrypt(user, debug, data_key["CiphertextBlob"], encryption_context={"package": "app"})
    assert caught.value.code == "AccessDeniedException"
    assert bytes(48).hex() in str(caught.value)


def test_document_from_another_ca_is_invalid(tmp_path, user, attested_key):
    _key_id, data_key = attested_key
    rogue = SimulatedNsm(LocalCA.load_or_create(tmp_path / "rogue-ca"), {0: PCR0_GOOD})
    with pytest.raises(KmsError) as caught:
        kms_recipient.decrypt(user, rogue, data_key["CiphertextBlob"], encryption_context={"package": "app"})
    assert caught.value.code == "ValidationException"
    assert "attestation document is not valid" in caught.value.__cause__.response["Error"]["Message"]


def test_recipient_parameter_is_checked(ca, user, attested_key):
    _key_id, data_key = attested_key
    blob = data_key["CiphertextBlob"]
    enclave = nsm(ca, PCR0_GOOD)
    recipient = kms_recipient.Recipient()
    bad_recipients = [
        {"AttestationDocument": enclave.attest(), "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},  # no public key
        {"AttestationDocument": enclave.attest(public_key=recipient.public_key_der), "KeyEncryptionAlgorithm": "X"},
        {"AttestationDocument": b"\xa0not a document", "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    ]
    for bad in bad_recipients:
        with pytest.raises(ClientError) as caught:
            user.decrypt(CiphertextBlob=blob, EncryptionContext={"package": "app"}, Recipient=bad)
        assert error_code(caught) == "ValidationException"


def test_kms_without_trusted_roots_refuses_documents(ca, tmp_path, attested_key):
    _key_id, data_key = attested_key
    with LocalKmsServer(LocalKms(tmp_path / "untrusting")) as untrusting, pytest.raises(KmsError) as caught:
        kms_recipient.generate_random(client(untrusting, USER), nsm(ca, PCR0_GOOD), 16)
    assert caught.value.code == "ValidationException"
    assert "trusts no attestation root" in str(caught.value)


def test_every_pcr_is_a_condition_key(ca, owner, user):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    policy = render_policy(
        account_id=ACCOUNT,
        user_principals=[USER_ARN],
        admin_principals=[OWNER_ARN],
        pcr0=[PCR0_GOOD.hex()],
        pcr8=[PCR8_OWNER.hex()],
    )
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    blob = owner.encrypt(KeyId=key_id, Plaintext=b"signed images only")["CiphertextBlob"]
    signed = nsm(ca, PCR0_GOOD, PCR8=PCR8_OWNER)
    assert kms_recipient.decrypt(user, signed, blob) == b"signed images only"
    unsigned = nsm(ca, PCR0_GOOD, PCR8=hashlib.sha384(b"someone else's certificate").digest())
    with pytest.raises(KmsError) as caught:
        kms_recipient.decrypt(user, unsigned, blob)
    assert caught.value.code == "AccessDeniedException"


def test_generate_data_key_and_random_for_the_enclave(ca, owner, user):
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]  # default policy: the whole account
    enclave = nsm(ca, PCR0_GOOD)
    plaintext, blob = kms_recipient.generate_data_key(user, enclave, key_id, encryption_context={"job": "1"})
    assert len(plaintext) == 32
    assert owner.decrypt(CiphertextBlob=blob, EncryptionContext={"job": "1"})["Plaintext"] == plaintext
    short, _wrapped = kms_recipient.generate_data_key(user, enclave, key_id, key_spec="AES_128")
    assert len(short) == 16
    randoms = {kms_recipient.generate_random(user, enclave, 64) for _i in range(2)}
    assert len(randoms) == 2 and all(len(r) == 64 for r in randoms)


def test_plaintext_answer_is_refused(ca):
    """An endpoint that ignores Recipient and answers Plaintext must not be believed."""

    class Careless:
        def decrypt(self, **kwargs):
            return {"Plaintext": b"leaked", "KeyId": "k"}

        def generate_random(self, **kwargs):
            return {"Plaintext": b"x" * kwargs["NumberOfBytes"], "CiphertextForRecipient": b"..."}

    with pytest.raises(KmsError, match="Plaintext instead of CiphertextForRecipient"):
        kms_recipient.decrypt(Careless(), nsm(ca, PCR0_GOOD), b"blob")
    with pytest.raises(KmsError, match="Plaintext instead of CiphertextForRecipient"):
        kms_recipient.generate_random(Careless(), nsm(ca, PCR0_GOOD), 4)


def test_unreachable_kms_is_a_kms_error(ca, server):
    endpoint = server.endpoint_url
    server.stop()
    gone = boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name="us-east-1",
        **server.kms.credentials(USER),
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    with pytest.raises(KmsError, match="check the KMS endpoint"):
        kms_recipient.generate_random(gone, nsm(ca, PCR0_GOOD), 8)


# ---------------------------------------------------------------- signing keys (the owner's package signer)


def test_signing_key_signs_verifies_and_publishes_its_public_key(owner):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    metadata = owner.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    assert (metadata["KeySpec"], metadata["KeyUsage"], metadata["SigningAlgorithms"]) == (
        "ECC_NIST_P384", "SIGN_VERIFY", ["ECDSA_SHA_384"]
    )  # fmt: skip
    assert "EncryptionAlgorithms" not in metadata
    answer = owner.get_public_key(KeyId=metadata["KeyId"])
    assert (answer["KeyId"], answer["KeySpec"], answer["KeyUsage"]) == (metadata["Arn"], "ECC_NIST_P384", "SIGN_VERIFY")
    public = serialization.load_der_public_key(answer["PublicKey"])
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"

    message = b"a package header"
    digest = hashlib.sha384(message).digest()
    signed = owner.sign(KeyId=metadata["KeyId"], Message=digest, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_384")
    assert signed["KeyId"] == metadata["Arn"]
    public.verify(signed["Signature"], message, ec.ECDSA(hashes.SHA384()))  # DIGEST signs exactly like RAW
    raw = owner.sign(KeyId=metadata["KeyId"], Message=message, SigningAlgorithm="ECDSA_SHA_384")["Signature"]
    public.verify(raw, message, ec.ECDSA(hashes.SHA384()))
    with pytest.raises(InvalidSignature):
        public.verify(raw, message + b"!", ec.ECDSA(hashes.SHA384()))

    assert owner.verify(KeyId=metadata["KeyId"], Message=message, Signature=raw, SigningAlgorithm="ECDSA_SHA_384")[
        "SignatureValid"
    ]
    with pytest.raises(owner.exceptions.KMSInvalidSignatureException):
        owner.verify(KeyId=metadata["KeyId"], Message=b"another", Signature=raw, SigningAlgorithm="ECDSA_SHA_384")


def test_signing_key_refuses_what_aws_refuses(owner):
    with pytest.raises(owner.exceptions.ClientError) as caught:
        owner.create_key(KeySpec="ECC_NIST_P384")  # AWS: an ECC key must name its KeyUsage
    assert error_code(caught) == "ValidationException"
    signing = owner.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    symmetric = owner.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(owner.exceptions.InvalidKeyUsageException):
        owner.generate_data_key(KeyId=signing, KeySpec="AES_256")
    with pytest.raises(owner.exceptions.InvalidKeyUsageException):
        owner.encrypt(KeyId=signing, Plaintext=b"x")
    with pytest.raises(owner.exceptions.InvalidKeyUsageException):
        owner.sign(KeyId=symmetric, Message=b"x", SigningAlgorithm="ECDSA_SHA_384")
    with pytest.raises(owner.exceptions.UnsupportedOperationException):
        owner.get_public_key(KeyId=symmetric)
    with pytest.raises(owner.exceptions.InvalidKeyUsageException):
        owner.sign(KeyId=signing, Message=b"x", SigningAlgorithm="RSASSA_PSS_SHA_256")
    with pytest.raises(owner.exceptions.ClientError) as caught:
        owner.sign(KeyId=signing, Message=b"not 48 bytes", MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_384")
    assert error_code(caught) == "ValidationException"
    owner.disable_key(KeyId=signing)
    with pytest.raises(owner.exceptions.DisabledException):
        owner.sign(KeyId=signing, Message=b"x", SigningAlgorithm="ECDSA_SHA_384")


def test_sign_is_governed_by_the_key_policy(owner, user):
    signing = owner.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Owner", "Effect": "Allow", "Principal": {"AWS": OWNER_ARN}, "Action": "kms:*", "Resource": "*"},
            {"Sid": "Public", "Effect": "Allow", "Principal": {"AWS": USER_ARN}, "Action": "kms:GetPublicKey",
             "Resource": "*"},
        ],
    }  # fmt: skip
    owner.put_key_policy(KeyId=signing, PolicyName="default", Policy=json.dumps(policy))
    assert user.get_public_key(KeyId=signing)["PublicKey"]
    with pytest.raises(user.exceptions.ClientError) as caught:
        user.sign(KeyId=signing, Message=b"the host's own header", SigningAlgorithm="ECDSA_SHA_384")
    assert error_code(caught) == "AccessDeniedException"


def test_signing_keys_have_no_automatic_rotation(owner):
    signing = owner.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    for call in (owner.get_key_rotation_status, owner.enable_key_rotation, owner.disable_key_rotation):
        with pytest.raises(owner.exceptions.UnsupportedOperationException):
            call(KeyId=signing)
