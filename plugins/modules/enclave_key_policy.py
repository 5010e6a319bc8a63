#!/usr/bin/python
# Copyright: confidential_ml.nitro developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION, EXAMPLES and RETURN before the imports)

from __future__ import annotations

DOCUMENTATION = r"""
module: enclave_key_policy
short_description: Allow attested Nitro Enclave images to decrypt with a KMS key
version_added: 0.1.0
description:
  - Writes into the key policy of a KMS key the statements that let an attested AWS Nitro Enclave, and only it,
    decrypt packages sealed under that key (see M(confidential_ml.nitro.enclave_package)).
  - Three statements, each recognised by its C(Sid) and replaced in place; every other statement of the policy
    (the owner's own) is kept unchanged and in order.
  - C(OwnerAdministers) gives O(admin_principals) C(kms:*).
  - C(EnclaveDecryptWithAttestation) allows O(user_principals) C(kms:Decrypt) only with an attestation document
    whose PCR0 (C(kms:RecipientAttestation:ImageSha384)) is an allowed value, and whose PCR8 is one of O(pcr8)
    when O(pcr8) is given.
  - C(DenyDecryptWithoutAttestation) denies C(kms:Decrypt) and C(kms:ReEncrypt*) to everyone without such an
    attestation, so that no other statement can hand the key to the parent host. With O(pcr8), a second Deny,
    C(DenyDecryptWithoutOwnerSignedImage), does the same for PCR8.
  - The allowed PCR0 values are O(pcr0) plus the values the policy already allows, limited by O(keep_newest).
  - Before writing, the whole resulting policy is checked (the same lint as C(enclave policy lint)); when it is
    unsound (for example another statement lets the parent host decrypt without an attestation) the module fails,
    names every problem and writes nothing.
  - The policy is read with C(DescribeKey) and C(GetKeyPolicy) and written with C(PutKeyPolicy) only when it
    differs from the current one as data (formatting and key order do not count).
author:
  - confidential_ml.nitro developers (@confidential-ml)
options:
  key_id:
    description:
      - The KMS key, as a key id, key ARN, alias name (V(alias/...)) or alias ARN.
    type: str
    required: true
  account_id:
    description:
      - The 12-digit AWS account that owns the key.
      - Required with O(state=present).
    type: str
  user_principals:
    description:
      - IAM principal ARNs (or 12-digit account ids) of the parent hosts that run the enclave; they may call
        C(kms:Decrypt) only from an attested enclave.
      - Must not overlap O(admin_principals), since an administrator could remove the Deny.
      - Required with O(state=present).
    type: list
    elements: str
  admin_principals:
    description:
      - IAM principal ARNs of the owner's roles that administer the key (C(kms:*)). Keep the principal that runs
        this module among them, or KMS refuses the new policy (it would lock that principal out).
      - Required with O(state=present). The account root is refused by the lint (an account-wide C(kms:*) without
        conditions lets every principal the account's IAM allows generate data keys), and AWS's default statement
        (C(Enable IAM User Permissions)) is replaced by this one; O(state=absent) puts it back when nothing else
        is left.
    type: list
    elements: str
  pcr0:
    description:
      - PCR0 values (the enclave image measurement, 96 hex characters as printed by C(nitro-cli build-enclave))
        to allow, newest first. Case and surrounding white space do not matter.
      - They are added to the values the policy already allows; with O(keep_newest), older values drop out.
      - All-zero values (debug-mode enclaves) are refused.
      - Required with O(state=present); may be empty to keep the values already allowed (for example to narrow
        them with O(keep_newest)).
    type: list
    elements: str
  pcr8:
    description:
      - PCR8 values (hash of the certificate that signed the enclave image) that the enclave must also attest.
      - Unlike O(pcr0), this list replaces the current one; an empty list removes the PCR8 requirement.
    type: list
    elements: str
    default: []
  keep_newest:
    description:
      - The rotation window, the number of PCR0 values the policy keeps allowing.
      - The candidates, newest first, are O(pcr0) in the order given, followed by the values the current policy
        already allows that are not in O(pcr0), in the order the policy lists them. Duplicates (ignoring case)
        count once, at their first place. The first O(keep_newest) candidates are allowed, the rest are removed.
      - The policy lists the values it allows newest first, as the module wrote them; KMS records no age for them,
        so that order is what tells the newest from the oldest. Allowing a new image with O(pcr0) and
        O(keep_newest=2) keeps it and the value allowed most recently before it.
      - When not set, every value already allowed stays allowed.
    type: int
  state:
    description:
      - V(present) writes the statements described above.
      - V(absent) removes those statements (by C(Sid)) and keeps all others. KMS refuses the result if it would no
        longer let the caller change the policy; keep another statement that does.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - confidential_ml.nitro.kms
attributes:
  check_mode:
    support: full
    details: Reads the current policy and reports the policy that would be written; writes nothing.
  diff_mode:
    support: full
    details: The policy before and after, as JSON with sorted keys.
  platform:
    platforms: posix
requirements:
  - python >= 3.11
seealso:
  - module: confidential_ml.nitro.enclave_package
  - name: Key policy condition keys for Nitro Enclaves
    description: The condition keys AWS KMS sets from an attestation document.
    link: https://docs.aws.amazon.com/kms/latest/developerguide/conditions-nitro-enclaves.html
"""

EXAMPLES = r"""
- name: Allow the new enclave image and keep the previous one during the rollout
  confidential_ml.nitro.enclave_key_policy:
    key_id: alias/confidential-ml
    account_id: "111122223333"
    user_principals:
      - arn:aws:iam::111122223333:role/enclave-host
    pcr0:
      - "{{ new_image.measurements.PCR0 }}"
    keep_newest: 2

- name: Pin the image signing certificate too, against the local KMS of the local backend
  confidential_ml.nitro.enclave_key_policy:
    key_id: "{{ key_arn }}"
    account_id: "111122223333"
    admin_principals:
      - arn:aws:iam::111122223333:role/owner
    user_principals:
      - arn:aws:iam::111122223333:role/enclave-host
    pcr0: ["{{ pcr0 }}"]
    pcr8: ["{{ pcr8 }}"]
    kms_endpoint_url: http://127.0.0.1:4566
    region: us-east-1
    access_key: owner
    secret_key: "{{ local_kms_secret }}"

- name: Take the enclave statements out of the key policy
  confidential_ml.nitro.enclave_key_policy:
    key_id: alias/confidential-ml
    state: absent
"""

RETURN = r"""
key_arn:
  description: ARN of the key whose policy was read (and written).
  returned: always
  type: str
  sample: arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab
policy:
  description: The key policy after the run (in check mode, the policy that would be written).
  returned: always
  type: dict
  sample:
    Version: "2012-10-17"
    Statement:
      - Sid: OwnerAdministers
        Effect: Allow
        Principal: {AWS: ["arn:aws:iam::111122223333:root"]}
        Action: ["kms:*"]
        Resource: "*"
allowed_pcr0:
  description: The PCR0 values the policy allows after the run, lowercase, newest first (as the policy lists them).
  returned: always
  type: list
  elements: str
  sample: ["5f1b...e3a9"]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import (
    EnclaveError,
    KmsCallError,
    UnsoundPolicyError,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy_update import (
    OwnerKeyPolicy,
    apply_key_policy,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.module_options import (
    BOTO3_IMPORT_ERROR,
    KMS_MUTUALLY_EXCLUSIVE,
    KMS_OPTIONS,
    kms_client,
    require_libraries,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "key_id": {"type": "str", "required": True},
            "account_id": {"type": "str"},
            "user_principals": {"type": "list", "elements": "str"},
            "admin_principals": {"type": "list", "elements": "str"},
            "pcr0": {"type": "list", "elements": "str"},
            "pcr8": {"type": "list", "elements": "str", "default": []},
            "keep_newest": {"type": "int"},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            **KMS_OPTIONS,
        },
        required_if=[("state", "present", ("account_id", "user_principals", "admin_principals", "pcr0"))],
        mutually_exclusive=KMS_MUTUALLY_EXCLUSIVE,
        supports_check_mode=True,
    )
    require_libraries(module, BOTO3_IMPORT_ERROR)
    params = module.params
    try:
        wanted = OwnerKeyPolicy(
            state=params["state"],
            account_id=params["account_id"],
            user_principals=params["user_principals"] or (),
            admin_principals=params["admin_principals"],
            pcr0=params["pcr0"] or (),
            pcr8=params["pcr8"],
            keep_newest=params["keep_newest"],
        )
        change = apply_key_policy(kms_client(module), params["key_id"], wanted, check_mode=module.check_mode)
    except UnsoundPolicyError as err:
        module.fail_json(msg=str(err), problems=err.problems, policy=err.policy)
    except KmsCallError as err:
        module.fail_json(msg=str(err), error_code=err.code)
    except EnclaveError as err:
        module.fail_json(msg=str(err))

    for warning in change.warnings:
        module.warn(warning)
    result = {
        "changed": change.changed,
        "key_arn": change.key_arn,
        "policy": change.after,
        "allowed_pcr0": change.allowed_pcr0,
    }
    if module._diff:
        result["diff"] = change.diff()
    module.exit_json(**result)


if __name__ == "__main__":
    main()
