#!/usr/bin/python
# Copyright: confidential_ml.nitro developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION, EXAMPLES and RETURN before the imports)

from __future__ import annotations

DOCUMENTATION = r"""
module: enclave_info
short_description: List the host's enclaves and ask an enclave server for its health and a verified attestation
version_added: 0.1.0
description:
  - Gathers the sections that O(gather) selects.
  - V(enclaves), the enclaves running on this host with the O(backend) (C(nitro-cli describe-enclaves) on
    C(nitro), the local runtime's records on C(local));
  - V(health), the enclave server's name, the job it runs (if any) and its share's free space;
  - V(attestation), the claims of a fresh attestation document from the enclave (random nonce), verified against
    the trusted roots (AWS Nitro root G1, and the local backend's root when this host has one), and against
    O(expect_pcr0) when given.
  - V(credentials), only when asked for, this host's AWS credentials for the job's KMS calls, found as
    M(confidential_ml.nitro.enclave_run) finds them (O(profile), the environment, shared files, the instance role);
    the task fails, saying what to set, when there are none or they are incomplete. Nothing is sent to AWS, so
    credentials that exist but are refused are not detected. run_job.yml checks this before it starts anything.
  - Changes nothing. When no endpoint is configured or nobody answers there, RV(health) and RV(attestation) are
    null and RV(endpoint_error) says why, without failing, so that the module can wait for an enclave to come up
    (C(until)). A document that does not verify fails the task.
author:
  - confidential_ml.nitro developers (@confidential-ml)
options:
  gather:
    description:
      - The sections to gather; the others are not returned.
    type: list
    elements: str
    choices: [enclaves, health, attestation, credentials]
    default: [enclaves, health, attestation]
  backend:
    description:
      - The runtime that lists RV(enclaves), V(nitro) (C(nitro-cli) on a Nitro parent instance) or V(local) (the
        local backend, without Nitro hardware).
      - When not set, E(ENCLAVE_BACKEND), else V(local).
    type: str
    choices: [local, nitro]
  region:
    description:
      - With V(credentials) in O(gather), the region to report; when not set, boto3 reads
        E(AWS_DEFAULT_REGION) or the profile's region (none is required; botocore does not read E(AWS_REGION)).
    type: str
    aliases: [aws_region]
  profile:
    description:
      - With V(credentials) in O(gather), the named profile whose credentials to check (as
        O(confidential_ml.nitro.enclave_run#module:profile)).
    type: str
    aliases: [aws_profile]
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - confidential_ml.nitro.enclave
attributes:
  check_mode:
    support: full
    details: The module only reads; it gathers the same in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
requirements:
  - python >= 3.11
  - nitro-cli, with O(backend=nitro) and V(enclaves) in O(gather)
seealso:
  - module: confidential_ml.nitro.enclave_run
  - module: confidential_ml.nitro.enclave_sync
  - module: confidential_ml.nitro.enclave_image
"""

EXAMPLES = r"""
- name: Everything about this host's enclave
  confidential_ml.nitro.enclave_info:
    expect_pcr0: "{{ owner_pcr0 }}"
  register: info

- name: Wait until the enclave server answers
  confidential_ml.nitro.enclave_info:
    endpoint: vsock://16:5000
    gather: [health]
  register: server
  until: server.health
  retries: 30
  delay: 1

- name: Pre-flight, before starting anything - this host has AWS credentials for the job's KMS calls
  confidential_ml.nitro.enclave_info:
    gather: [credentials]

- name: The enclaves nitro-cli knows
  confidential_ml.nitro.enclave_info:
    backend: nitro
    gather: [enclaves]
  register: nitro
"""

RETURN = r"""
enclaves:
  description: The running enclaves, as C(nitro-cli describe-enclaves) describes them, plus C(Endpoint).
  returned: when V(enclaves) is in O(gather)
  type: list
  elements: dict
  sample:
    - EnclaveName: app
      EnclaveID: i-0123456789abcdef0-enc0123456789abcdef
      ProcessID: 4242
      EnclaveCID: 16
      NumberOfCPUs: 2
      CPUIDs: [1, 3]
      MemoryMiB: 2048
      State: RUNNING
      Flags: NONE
      Endpoint: vsock://16:5000
credentials:
  description: Where this host's AWS credentials for KMS were found (the secret key is never returned).
  returned: when V(credentials) is in O(gather)
  type: dict
  contains:
    access_key_id:
      description: The access key id boto3 found.
      type: str
      sample: AKIAIOSFODNN7EXAMPLE
    region:
      description: The region boto3 found or O(region) gave; null when none is configured.
      type: str
      sample: eu-west-1
backend:
  description: The backend that listed RV(enclaves).
  returned: when V(enclaves) is in O(gather)
  type: str
  sample: nitro
endpoint:
  description: The enclave server asked for RV(health) and RV(attestation); null when none is configured.
  returned: when V(health) or V(attestation) is in O(gather)
  type: str
  sample: vsock://16:5000
reachable:
  description: Whether the enclave server at RV(endpoint) answered.
  returned: when V(health) or V(attestation) is in O(gather)
  type: bool
  sample: true
endpoint_error:
  description: Why RV(health) and RV(attestation) are null (no endpoint configured, or nobody answers there).
  returned: when the enclave server could not be reached
  type: str
  sample: "no enclave listens on vsock://16:5000 (Connection reset by peer): is the enclave running?"
health:
  description: What the enclave server reports about itself; null when it could not be reached.
  returned: when V(health) is in O(gather)
  type: dict
  contains:
    server:
      description: The server's name and version.
      type: str
      sample: enclave-server/0.1.0
    job:
      description: The job running now, or null.
      type: str
      sample: job 3f9a1c2b7d4e (ml_algorithm.py from /encrypted/app.pkg, running for 12s)
    share:
      description: The share's file system statistics, as C(statvfs) gives them.
      type: dict
      sample: {"bsize": 4096, "blocks": 262144, "bavail": 250000}
attestation:
  description:
    - The claims of a fresh attestation document, verified (signature, certificate chain, nonce, age, PCR0 against
      O(expect_pcr0) when given); null when the enclave could not be reached.
  returned: when V(attestation) is in O(gather)
  type: dict
  contains:
    module_id:
      description: The enclave's id.
      type: str
      sample: i-0123456789abcdef0-enc0123456789abcdef
    digest:
      description: The PCR digest algorithm.
      type: str
      sample: SHA384
    timestamp:
      description: When the NSM signed the document, milliseconds since the epoch.
      type: int
      sample: 1738324804654
    time:
      description: The same time, ISO 8601 in UTC.
      type: str
      sample: "2025-01-31T12:00:04.654000+00:00"
    debug_mode:
      description: Whether the enclave runs in debug mode (all-zero PCRs).
      type: bool
      sample: false
    pcrs:
      description: The PCRs by index, hex.
      type: dict
      sample: {"0": "7fb5c55bc2ecbb68ed99a13d7122abfc0666b926a79d5379bc58b9445c84217f59cfdd36c08b2c79552928702efe23e4"}
    nonce:
      description: The random nonce the module sent (hex).
      type: str
      sample: 5d1c0b6a3e0f4a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b
    public_key:
      description: Public key in the document (hex), or null.
      type: str
      sample: null
    user_data:
      description: User data in the document (hex), or null.
      type: str
      sample: null
    certificate:
      description: The NSM signing certificate (subject, issuer, serial_number, validity, sha256).
      type: dict
      sample: {"subject": "CN=i-0123456789abcdef0-enc0123456789abcdef", "sha256": "5e1f..."}
    root:
      description: The trusted root the chain ends in (subject, sha256).
      type: dict
      sample: {"subject": "CN=aws.nitro-enclaves,C=US,O=Amazon,OU=AWS", "sha256": "641a0321..."}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import IMPORT_ERROR as CLIENT_IMPORT_ERROR
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import host_kms_settings
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import AttestationError, EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.module_options import (
    BACKEND_OPTIONS,
    BOTO3_IMPORT_ERROR,
    ENCLAVE_MUTUALLY_EXCLUSIVE,
    ENCLAVE_OPTIONS,
    ENCLAVE_REQUIRED_BY,
    enclave_client,
    enclave_endpoint,
    require_libraries,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.runtime import get_runtime

SECTIONS = ["enclaves", "health", "attestation", "credentials"]


def enclaves(module):
    try:
        runtime = get_runtime(module.params["backend"])
        listed = [info.to_json() for info in runtime.describe()]
    except EnclaveError as err:
        module.fail_json(msg=f"cannot list the enclaves: {err}")
    return {"backend": getattr(runtime, "backend", module.params["backend"]), "enclaves": listed}


def credentials(module):
    """This host's AWS credentials for KMS, found as enclave_run finds them; fails the task when there are none."""
    require_libraries(module, BOTO3_IMPORT_ERROR)
    try:
        found = host_kms_settings(region=module.params["region"], profile=module.params["profile"], need_region=False)
    except EnclaveError as err:
        module.fail_json(msg=f"this host has no usable AWS credentials for the job's KMS calls: {err}")
    return {"credentials": {"access_key_id": found["aws_access_key_id"], "region": found["region"]}}


def server(module, gather):
    """Health and attestation of the enclave server, or nulls and the reason it could not be reached."""
    result = {"endpoint": None, "reachable": False}
    result.update({section: None for section in ("health", "attestation") if section in gather})
    try:
        result["endpoint"] = enclave_endpoint(module)
        client = enclave_client(module, result["endpoint"], required=False)
    except AttestationError as err:
        module.fail_json(msg=str(err), **result)
    except EnclaveError as err:
        result["endpoint_error"] = str(err)
        return result
    result["reachable"] = True
    with client:
        try:
            if "health" in gather:
                result["health"] = client.call("health")
            if "attestation" in gather:
                result["attestation"] = (client.attested or client.attest()).to_json()
        except EnclaveError as err:
            module.fail_json(msg=f"the enclave server at {result['endpoint']} answered, then failed: {err}", **result)
    return result


def main():
    module = AnsibleModule(
        argument_spec={
            "gather": {"type": "list", "elements": "str", "choices": SECTIONS, "default": SECTIONS[:3]},
            "region": {"type": "str", "aliases": ["aws_region"]},
            "profile": {"type": "str", "aliases": ["aws_profile"]},
            **BACKEND_OPTIONS,
            **ENCLAVE_OPTIONS,
        },
        mutually_exclusive=ENCLAVE_MUTUALLY_EXCLUSIVE,
        required_by=ENCLAVE_REQUIRED_BY,
        supports_check_mode=True,
    )
    require_libraries(module, CLIENT_IMPORT_ERROR)
    gather = module.params["gather"]
    result = {"changed": False}
    if "credentials" in gather:
        result.update(credentials(module))
    if "enclaves" in gather:
        result.update(enclaves(module))
    if "health" in gather or "attestation" in gather:
        result.update(server(module, gather))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
