"""enclave_key_policy through main() against a real local KMS: idempotence, check mode, diff, rotation, lint."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError

from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import (
    OUR_SIDS,
    SID_ADMIN,
    SID_ALLOW,
    SID_DENY,
    SID_DENY_PCR8,
)
from ansible_collections.confidential_ml.nitro.plugins.modules import enclave_key_policy

ACCOUNT = "111122223333"  # the local KMS's account; access key id X is the role X
OWNER_ARN = f"arn:aws:iam::{ACCOUNT}:role/owner"
USER_ARN = f"arn:aws:iam::{ACCOUNT}:role/enclave-host"
# Five image measurements, A..E in ascending hex order.
A, B, C, D, E = sorted(hashlib.sha384(b"image %d" % n).hexdigest() for n in range(5))
PCR8 = hashlib.sha384(b"the owner's signing certificate").hexdigest()
ENCLAVE = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]
DEFAULT_SID = "Enable IAM User Permissions"  # the statement of KMS's default key policy


@pytest.fixture
def args(key, connection):
    return {
        "key_id": key["KeyId"],
        "account_id": ACCOUNT,
        "user_principals": [USER_ARN],
        "admin_principals": [OWNER_ARN],  # required now: lint refuses the account root's unconditioned kms:*
        "pcr0": [A],
        **connection,
    }


def stored(owner, key):
    return owner.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"]


def sids(policy):
    return [statement.get("Sid") for statement in policy["Statement"]]


def allow_condition(policy):
    (allow,) = [s for s in policy["Statement"] if s["Sid"] == SID_ALLOW]
    return allow["Condition"]["StringEqualsIgnoreCase"]


def test_first_run_writes_the_policy_second_run_changes_nothing(run_module, args, owner, key):
    first = run_module(enclave_key_policy.main, args)
    assert first["changed"] is True
    assert first["key_arn"] == key["Arn"]
    assert first["allowed_pcr0"] == [A]
    # What KMS holds now is what the module returned; KMS's default statement (the whole account, kms:*) is
    # replaced by the owner's roles: lint refuses it (changed on purpose; state=absent puts it back).
    assert json.loads(stored(owner, key)) == first["policy"]
    assert sids(first["policy"]) == [SID_ADMIN, SID_ALLOW, SID_DENY]
    assert allow_condition(first["policy"])["kms:RecipientAttestation:ImageSha384"] == [A]

    text = stored(owner, key)
    second = run_module(enclave_key_policy.main, args)
    assert second["changed"] is False
    assert second["policy"] == first["policy"]
    assert stored(owner, key) == text


def test_the_written_policy_keeps_the_parent_host_out(run_module, args, owner, key, kms_client):
    run_module(enclave_key_policy.main, args)
    blob = owner.encrypt(KeyId=key["KeyId"], Plaintext=b"data key")["CiphertextBlob"]
    with pytest.raises(ClientError) as denied:
        kms_client("enclave-host").decrypt(CiphertextBlob=blob)
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    assert SID_DENY in str(denied.value)


def test_semantically_equal_policy_is_not_rewritten(run_module, args, owner, key):
    policy = run_module(enclave_key_policy.main, args)["policy"]
    # Same document, other formatting and key order: still no change, and the stored text is left alone.
    reordered = json.dumps({"Statement": policy["Statement"], "Version": policy["Version"]}, separators=(",", ":"))
    owner.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=reordered)
    result = run_module(enclave_key_policy.main, args)
    assert result["changed"] is False
    assert stored(owner, key) == reordered


def test_check_mode_reports_the_change_and_writes_nothing(run_module, args, owner, key):
    before = stored(owner, key)
    result = run_module(enclave_key_policy.main, args, check_mode=True)
    assert result["changed"] is True
    assert result["allowed_pcr0"] == [A]
    assert SID_ALLOW in sids(result["policy"])
    assert stored(owner, key) == before

    run_module(enclave_key_policy.main, args)
    written = stored(owner, key)
    rotated = run_module(enclave_key_policy.main, dict(args, pcr0=[B]), check_mode=True)
    assert rotated["changed"] is True
    assert rotated["allowed_pcr0"] == [B, A]
    assert stored(owner, key) == written


def test_diff_shows_the_policy_before_and_after(run_module, args, owner, key):
    result = run_module(enclave_key_policy.main, args, diff=True)
    before, after = result["diff"]["before"], result["diff"]["after"]
    assert json.loads(before) == {
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [
            {
                "Sid": DEFAULT_SID,
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    assert json.loads(after) == result["policy"]
    assert A in after and A not in before

    again = run_module(enclave_key_policy.main, args, diff=True)
    assert again["changed"] is False
    assert again["diff"]["before"] == again["diff"]["after"] == after


def test_without_keep_newest_every_allowed_value_stays(run_module, args):
    run_module(enclave_key_policy.main, args)
    result = run_module(enclave_key_policy.main, dict(args, pcr0=[B]))
    assert result["changed"] is True
    assert result["allowed_pcr0"] == [B, A]  # newest first
    # The Deny lets through exactly the allowed values.
    (deny,) = [s for s in result["policy"]["Statement"] if s["Sid"] == SID_DENY]
    assert deny["Condition"]["StringNotEqualsIgnoreCase"]["kms:RecipientAttestation:ImageSha384"] == [B, A]


def test_rotation_window_keeps_the_newest_values(run_module, args):
    run_module(enclave_key_policy.main, dict(args, pcr0=[A, B]))
    # Candidates newest first: C (given now), then A and B in the policy's order; the window keeps two.
    rotated = run_module(enclave_key_policy.main, dict(args, pcr0=[C], keep_newest=2))
    assert rotated["changed"] is True
    assert rotated["allowed_pcr0"] == [C, A]
    # Applying the same rotation again is not a change.
    again = run_module(enclave_key_policy.main, dict(args, pcr0=[C], keep_newest=2))
    assert again["changed"] is False
    assert again["allowed_pcr0"] == [C, A]
    # The next image: the policy's order says A is older than C, so A drops out.
    newer = run_module(enclave_key_policy.main, dict(args, pcr0=[D], keep_newest=2))
    assert newer["allowed_pcr0"] == [D, C]
    # Values given now come first, in the order given (uppercase and spaces are the same value).
    given = run_module(enclave_key_policy.main, dict(args, pcr0=[f" {E.upper()} ", D, B], keep_newest=2))
    assert given["allowed_pcr0"] == [E, D]
    # keep_newest=1 leaves the newest only.
    single = run_module(enclave_key_policy.main, dict(args, pcr0=[B], keep_newest=1))
    assert single["allowed_pcr0"] == [B]
    assert allow_condition(single["policy"])["kms:RecipientAttestation:ImageSha384"] == [B]


def test_no_new_pcr0_keeps_the_allowed_ones(run_module, args):
    run_module(enclave_key_policy.main, dict(args, pcr0=[A, B]))
    kept = run_module(enclave_key_policy.main, dict(args, pcr0=[]))
    assert kept["changed"] is False
    assert kept["allowed_pcr0"] == [A, B]
    narrowed = run_module(enclave_key_policy.main, dict(args, pcr0=[], keep_newest=1))
    assert narrowed["allowed_pcr0"] == [A]


def test_pcr8_is_pinned_and_unpinned(run_module, args):
    pinned = run_module(enclave_key_policy.main, dict(args, pcr8=[PCR8]))
    assert pinned["changed"] is True
    assert SID_DENY_PCR8 in sids(pinned["policy"])
    assert allow_condition(pinned["policy"])["kms:RecipientAttestation:PCR8"] == [PCR8]
    assert run_module(enclave_key_policy.main, dict(args, pcr8=[PCR8]))["changed"] is False
    unpinned = run_module(enclave_key_policy.main, args)
    assert unpinned["changed"] is True
    assert SID_DENY_PCR8 not in sids(unpinned["policy"])
    assert "kms:RecipientAttestation:PCR8" not in allow_condition(unpinned["policy"])


def test_an_unsound_policy_fails_with_the_problems_and_writes_nothing(run_module, args, owner, key):
    legacy = {
        "Sid": "LegacyHostAccess",
        "Effect": "Allow",
        "Principal": {"AWS": USER_ARN},
        "Action": "kms:Decrypt",
        "Resource": "*",
    }
    policy = json.loads(stored(owner, key))
    policy["Statement"].append(legacy)
    owner.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=json.dumps(policy))
    before = stored(owner, key)

    for check_mode in (True, False):
        result = run_module(enclave_key_policy.main, args, check_mode=check_mode)
        assert result["failed"] is True
        assert result["msg"].startswith("refusing to write an unsound key policy")
        assert "statement LegacyHostAccess grants kms:Decrypt to " + USER_ARN in result["msg"]
        assert "Nothing was written" in result["msg"]
        assert any("LegacyHostAccess" in problem for problem in result["problems"])
        assert stored(owner, key) == before


def test_state_absent_removes_only_our_statements(run_module, args, owner, key, connection):
    run_module(enclave_key_policy.main, args)
    absent = {"key_id": key["KeyId"], "state": "absent", **connection}
    check = run_module(enclave_key_policy.main, absent, check_mode=True)
    assert check["changed"] is True
    assert SID_ALLOW in sids(json.loads(stored(owner, key)))

    removed = run_module(enclave_key_policy.main, absent, diff=True)
    assert removed["changed"] is True
    assert sids(removed["policy"]) == [DEFAULT_SID]
    assert removed["allowed_pcr0"] == []
    assert SID_ALLOW in removed["diff"]["before"] and SID_ALLOW not in removed["diff"]["after"]
    assert json.loads(stored(owner, key)) == removed["policy"]
    assert not set(OUR_SIDS) & set(sids(json.loads(stored(owner, key))))

    assert run_module(enclave_key_policy.main, absent)["changed"] is False


def test_alias_is_resolved_to_the_key(run_module, args, owner, key):
    owner.create_alias(AliasName="alias/confidential-ml", TargetKeyId=key["KeyId"])
    result = run_module(enclave_key_policy.main, dict(args, key_id="alias/confidential-ml"))
    assert result["changed"] is True
    assert result["key_arn"] == key["Arn"]
    assert run_module(enclave_key_policy.main, dict(args, key_id=key["Arn"]))["changed"] is False


def test_explicit_admins_must_keep_the_caller(run_module, args, owner, key):
    kept = run_module(enclave_key_policy.main, dict(args, admin_principals=[OWNER_ARN]))
    assert kept["changed"] is True
    (admin,) = [s for s in kept["policy"]["Statement"] if s["Sid"] == SID_ADMIN]
    assert admin["Principal"] == {"AWS": [OWNER_ARN]}

    before = stored(owner, key)
    # Drop the default statement too, so nothing would let the owner change the policy again: KMS refuses.
    policy = json.loads(before)
    policy["Statement"] = [s for s in policy["Statement"] if s["Sid"] != DEFAULT_SID]
    owner.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=json.dumps(policy))
    before = stored(owner, key)
    other = f"arn:aws:iam::{ACCOUNT}:role/someone-else"
    locked = run_module(enclave_key_policy.main, dict(args, admin_principals=[other]))
    assert locked["failed"] is True
    assert "PutKeyPolicy" in locked["msg"] and "MalformedPolicyDocumentException" in locked["msg"]
    assert "keep the caller among admin_principals" in locked["msg"]
    assert stored(owner, key) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pcr0": ["abc"]}, "is not a SHA-384 measurement"),
        ({"pcr0": ["0" * 96]}, "all zeros"),
        ({"user_principals": ["*"]}, "is not an IAM principal ARN"),
        ({"account_id": "1234"}, "is not a 12-digit AWS account id"),
        ({"admin_principals": [USER_ARN]}, "would be both key administrator and enclave user"),
        ({"keep_newest": 0}, "keep_newest is 0; give 1 or more"),
    ],
)
def test_bad_arguments_fail_clearly_and_write_nothing(run_module, args, owner, key, change, message):
    before = stored(owner, key)
    result = run_module(enclave_key_policy.main, dict(args, **change))
    assert result["failed"] is True
    assert message in result["msg"]
    assert stored(owner, key) == before


def test_missing_arguments_for_present(run_module, key, connection):
    result = run_module(enclave_key_policy.main, {"key_id": key["KeyId"], **connection})
    assert result["failed"] is True
    assert (
        "state is present but all of the following are missing: account_id, user_principals, admin_principals, pcr0"
        in result["msg"]
    )


def test_kms_errors_name_the_operation_and_what_to_do(run_module, args, owner, key, kms_server):
    missing = run_module(enclave_key_policy.main, dict(args, key_id="alias/does-not-exist"))
    assert missing["failed"] is True
    assert missing["msg"].startswith("KMS DescribeKey on alias/does-not-exist failed")
    assert "check key_id, region and kms_endpoint_url" in missing["msg"]
    assert missing["error_code"] == "NotFoundException"

    # Only the owner administers the key now (no account-wide statement): anyone else is refused.
    run_module(enclave_key_policy.main, dict(args, admin_principals=[OWNER_ARN]))
    policy = json.loads(stored(owner, key))
    policy["Statement"] = [s for s in policy["Statement"] if s["Sid"] != DEFAULT_SID]
    owner.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=json.dumps(policy))
    # "admin": an authenticated principal of the local KMS that the policy no longer names.
    admin = kms_server.kms.credentials("admin")
    stranger = run_module(
        enclave_key_policy.main,
        dict(args, access_key=admin["aws_access_key_id"], secret_key=admin["aws_secret_access_key"]),
    )
    assert stranger["failed"] is True
    assert "AccessDeniedException" in stranger["msg"]
    assert "run as one of the key's administrators" in stranger["msg"]


def test_secret_key_is_not_logged(run_module, args):
    result = run_module(enclave_key_policy.main, dict(args, secret_key="s3cr3t-value-xyz"))
    assert "s3cr3t-value-xyz" not in json.dumps(result)
    assert result["invocation"]["module_args"]["secret_key"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    # The access key id is no secret: hiding it would mask every ARN or text that contains it.
    assert result["invocation"]["module_args"]["access_key"] == args["access_key"]


def policy_apply(connection, key_id, *flags):
    """`enclave policy apply` as the owner runs it, with the owner's credentials of the local KMS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ACCESS_KEY_ID": connection["access_key"], "AWS_SECRET_ACCESS_KEY": connection["secret_key"]}
    where = ["--kms-endpoint", connection["kms_endpoint_url"], "--region", connection["region"]]
    command = [*ENCLAVE, "policy", "apply", key_id, *where, *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=False)


@pytest.mark.slow  # a dozen `enclave` processes
def test_the_cli_makes_the_same_decisions_as_the_module(run_module, args, owner, connection):
    """`enclave policy apply` and the module share one decision: on two keys, the same steps give the same
    policies, the same changed/unchanged answers (--check too), the same refusals."""
    other = owner.create_key(Description="the CLI's key")["KeyMetadata"]
    principals = ["--account-id", ACCOUNT, "--user-principal", USER_ARN, "--admin-principal", OWNER_ARN]
    steps = [
        ({"pcr0": [A, B]}, ["--pcr0", A, "--pcr0", B]),
        ({"pcr0": [C], "keep_newest": 2}, ["--pcr0", C, "--keep-newest", "2"]),
        ({"pcr0": [C], "keep_newest": 2}, ["--pcr0", C, "--keep-newest", "2"]),  # again: unchanged
        ({"pcr0": [], "keep_newest": 1}, ["--keep-newest", "1"]),
    ]
    changes = []
    for change, flags in steps:
        by_module = run_module(enclave_key_policy.main, dict(args, **change))
        check = policy_apply(connection, other["KeyId"], *principals, *flags, "--check", "--json")
        assert check.returncode == 0, check.stderr
        by_cli = policy_apply(connection, other["KeyId"], *principals, *flags, "--json")
        assert by_cli.returncode == 0, by_cli.stderr
        checked, applied = json.loads(check.stdout), json.loads(by_cli.stdout)
        assert applied["changed"] is checked["changed"] is by_module["changed"]
        assert applied["allowed_pcr0"] == by_module["allowed_pcr0"]
        assert applied["key_arn"] == other["Arn"]
        assert applied["policy"] == json.loads(stored(owner, other)) == by_module["policy"]
        changes.append(applied["changed"])
    assert changes == [True, True, False, True]
    again = policy_apply(connection, other["KeyId"], *principals, "--keep-newest", "1")
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"key policy of {other['Arn']} unchanged; allowed PCR0: {C}\n"

    # A refusal names the problems and writes nothing, in both.
    sound = json.loads(stored(owner, other))
    legacy = {"Sid": "LegacyHostAccess", "Effect": "Allow", "Principal": {"AWS": USER_ARN}, "Action": "kms:Decrypt"}
    unsound = sound | {"Statement": [*sound["Statement"], legacy | {"Resource": "*"}]}
    owner.put_key_policy(KeyId=other["KeyId"], PolicyName="default", Policy=json.dumps(unsound))
    before = stored(owner, other)
    refused = policy_apply(connection, other["KeyId"], *principals, "--pcr0", D)
    assert refused.returncode != 0
    assert "refusing to write an unsound key policy" in refused.stderr and "LegacyHostAccess" in refused.stderr
    assert stored(owner, other) == before
    owner.put_key_policy(KeyId=other["KeyId"], PolicyName="default", Policy=json.dumps(sound))

    # --absent takes ours out (KMS's default statement comes back); errors say what to do, in the CLI's words.
    gone = policy_apply(connection, other["KeyId"], "--absent", "--diff")
    assert gone.returncode == 0, gone.stderr
    assert f'-      "Sid": "{SID_ALLOW}"' in gone.stdout and " changed; allowed PCR0: none" in gone.stdout
    assert sids(json.loads(stored(owner, other))) == [DEFAULT_SID]
    missing = policy_apply(connection, "alias/does-not-exist", "--absent")
    assert missing.returncode != 0
    assert "KMS DescribeKey on alias/does-not-exist failed" in missing.stderr
    assert "check KEY_ID, --region and --kms-endpoint" in missing.stderr
    unnamed = policy_apply(connection, other["KeyId"], "--pcr0", A)
    assert unnamed.returncode != 0
    assert "policy apply needs --account-id, --user-principal, --admin-principal" in unnamed.stderr
