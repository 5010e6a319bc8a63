"""What the owner asks of a KMS key's policy, decided once for the enclave_key_policy module and `enclave policy
apply`: the policy to write (our statements with the PCR0 rotation window, or without them), refused when lint
finds it unsound, and written to KMS only when it differs as data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import KmsCallError, PolicyError, UnsoundPolicyError
from .key_policy import allowed_pcr0, check_keep_newest, policy_diff, remove_ours, render_policy, rotation_window
from .policy_eval import load_policy
from .policy_lint import lint

try:
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError:  # only apply_key_policy talks to KMS; the modules report a missing boto3 (require_libraries)
    _BOTO_ERRORS: tuple = ()
else:
    _BOTO_ERRORS = (BotoCoreError, ClientError)


@dataclass(frozen=True)
class KeyPolicyChange:
    """A key policy before and after (in check mode: what would be written), and what the run had to say."""

    key_arn: str
    before: dict
    after: dict
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        # As data: formatting and key order do not count, so a second run with the same inputs changes nothing.
        return self.after != self.before

    @property
    def allowed_pcr0(self) -> list[str]:
        return allowed_pcr0(self.after)

    def diff(self) -> dict:
        return policy_diff(self.before, self.after)


@dataclass(frozen=True)
class OwnerKeyPolicy:
    """What the owner asks of a key's policy: our statements present, with the PCR0 rotation window, or absent.

    pcr0 is added to the values the policy allows now (see rotation_window); pcr8 replaces the current list."""

    state: str = "present"
    account_id: str | None = None
    user_principals: Sequence[str] = ()
    admin_principals: Sequence[str] | None = None
    pcr0: Sequence[str] = ()
    pcr8: Sequence[str] = ()
    keep_newest: int | None = None

    def __post_init__(self):  # before any KMS call: bad input fails first
        if self.state not in ("present", "absent"):
            raise PolicyError(f"state is {self.state!r}; give present or absent.")
        check_keep_newest(self.keep_newest)

    def plan(self, current: dict | str, key_arn: str) -> KeyPolicyChange:
        """The policy to write over current; raises UnsoundPolicyError when lint refuses it."""
        before = load_policy(current)
        if self.state == "absent":
            return KeyPolicyChange(key_arn, before, remove_ours(before, key_arn))
        window, warnings = rotation_window(self.pcr0, allowed_pcr0(before), self.keep_newest)
        after = render_policy(
            account_id=self.account_id,
            user_principals=self.user_principals,
            admin_principals=self.admin_principals,
            pcr0=window,
            pcr8=self.pcr8,
            existing=before,
        )
        problems = lint(after, user_principals=self.user_principals)
        if problems:
            raise UnsoundPolicyError(key_arn, problems, after)
        return KeyPolicyChange(key_arn, before, after, tuple(warnings))


# What to do about a failed KMS call, by error code; {key_id} and {admin_principals} name the caller's options.
_KMS_ADVICE = {
    "AccessDeniedException": "the caller is not allowed to do this; run as one of the key's administrators",
    "NotFoundException": "check {key_id}, {region} and {kms_endpoint_url}",
    "MalformedPolicyDocumentException": "KMS refused the policy; keep the caller among {admin_principals} (or in"
    " another statement that allows kms:PutKeyPolicy)",
}
_KMS_DEFAULT_ADVICE = "check the KMS connection options and the key"
OPTION_NAMES = {name: name for name in ("key_id", "region", "kms_endpoint_url", "admin_principals")}


def apply_key_policy(
    kms, key_id: str, wanted: OwnerKeyPolicy, *, check_mode: bool = False, names: Mapping[str, str] = OPTION_NAMES
) -> KeyPolicyChange:
    """Read the key's policy (DescribeKey resolves an alias: GetKeyPolicy and PutKeyPolicy take none), plan the
    change, and write it with PutKeyPolicy only when it differs as data, never in check mode. kms is a boto3 KMS
    client; names: how the caller spells the options its advice names (the module's by default)."""

    def call(operation: str, method, target: str, **kwargs):
        try:
            return method(**kwargs)
        except _BOTO_ERRORS as err:
            code = (getattr(err, "response", None) or {}).get("Error", {}).get("Code") or None
            # code None: botocore failed before KMS answered
            advice = _KMS_ADVICE.get(code or "", _KMS_DEFAULT_ADVICE).format(**{**OPTION_NAMES, **names})
            raise KmsCallError(
                f"KMS {operation} on {target} failed: {err}; {advice}", code=code, operation=operation
            ) from err

    key_arn = call("DescribeKey", kms.describe_key, key_id, KeyId=key_id)["KeyMetadata"]["Arn"]
    text = call("GetKeyPolicy", kms.get_key_policy, key_arn, KeyId=key_arn, PolicyName="default")["Policy"]
    try:
        current = json.loads(text)
    except ValueError as err:
        raise PolicyError(f"the key policy of {key_arn} is not JSON ({err}); fix it in KMS first.") from err
    try:
        change = wanted.plan(current, key_arn)
    except UnsoundPolicyError:
        raise
    except PolicyError as err:
        raise PolicyError(f"cannot compute the key policy of {key_arn}: {err}") from err
    if change.changed and not check_mode:
        call(
            "PutKeyPolicy",
            kms.put_key_policy,
            key_arn,
            KeyId=key_arn,
            PolicyName="default",
            Policy=json.dumps(change.after, indent=2),
        )
    return change
