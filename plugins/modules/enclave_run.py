#!/usr/bin/python
# Copyright: confidential_ml.nitro developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION, EXAMPLES and RETURN before the imports)

from __future__ import annotations

DOCUMENTATION = r"""
module: enclave_run
short_description: Run a script of an encrypted package inside the enclave and return its output and receipt
version_added: 0.1.0
description:
  - Asks the enclave server to run the script O(script) of the encrypted package O(package), which must already be
    in the enclave's share under C(/encrypted) (see M(confidential_ml.nitro.enclave_sync)).
  - Inside the enclave, the server obtains an attestation document, asks KMS for the package's data key with it
    (KMS releases the key only when the enclave's PCR0 is one the owner allowed in the key policy), opens the
    package into private memory, runs the script with O(args), streams its output back and removes the plaintext,
    whatever happens. The host never sees the package's content.
  - KMS is called with this host's AWS credentials (the instance role on Nitro; O(profile) or the environment
    otherwise), which travel with the job to the enclave; the key policy lets them decrypt only from an attested
    enclave.
  - Returns like M(ansible.builtin.command) (O(args) never pass through a shell), plus the files the script left in
    C(/output) and the job's receipt, an attestation document the enclave signed over the job summary.
  - Fails when the script exits with a non-zero status (with every result field, as M(ansible.builtin.command)
    does), when it runs out of O(timeout), and when the job is cancelled.
  - Runs one job at a time per enclave; the enclave refuses a second job while one runs.
  - Works with C(async) and C(poll) for long jobs; the job is killed if the module is killed (for example when the
    C(async) time runs out), since the server stops a job whose client disconnects.
author:
  - confidential_ml.nitro developers (@confidential-ml)
options:
  package:
    description:
      - The encrypted package to open, as a file name in the share's C(/encrypted) (V(app.pkg)) or a share path
        under C(/encrypted) (V(/encrypted/app.pkg)).
    type: str
    required: true
  script:
    description:
      - The C(.py) file inside the package to run, relative to the package's root (V(ml_algorithm.py),
        V(tools/train.py)). Only scripts from the package can run.
    type: str
    required: true
  args:
    description:
      - Arguments to the script, as a list of strings (passed as they are) or a string split the way a shell
        would split it (quotes group, no variables, globs or redirections).
      - Absolute paths must be in the share (V(/dataset), V(/model), V(/output) or V(/encrypted)); relative ones
        resolve inside the package.
    type: raw
    default: []
  timeout:
    description:
      - Seconds the script may run; it is then killed (with the processes it started) and the module fails.
      - When not set, the script runs until it exits. With C(async), set this below the C(async) time so that the
        module, not Ansible, reports the timeout.
    type: float
  clear_output:
    description:
      - Remove whatever is in the share's C(/output) before the job starts.
      - A job starts only on an empty C(/output), so that its receipt lists exactly the files it wrote; without
        this option the enclave refuses to start while files from before are there (pull them first; the
        module never removes outputs unless told to).
    type: bool
    default: false
  region:
    description:
      - The AWS region of the package's KMS key.
      - When not set, boto3 reads E(AWS_DEFAULT_REGION) or the profile's region (botocore does not read
        E(AWS_REGION)).
    type: str
    aliases: [aws_region]
  profile:
    description:
      - A named profile from the AWS shared configuration and credentials files whose credentials the job uses
        for KMS.
      - When not set, boto3 finds credentials itself (environment, shared files, the instance role via IMDSv2).
    type: str
    aliases: [aws_profile]
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - confidential_ml.nitro.enclave
attributes:
  check_mode:
    support: partial
    details:
      - Checks that the host has KMS credentials and a region, that the enclave attests one of O(expect_pcr0) when
        it is given, and that O(package) is a file in the share; then skips the task without running anything.
      - Whether O(script) exists in the package cannot be checked without the package key, which only the
        enclave can get; the run itself tells.
  diff_mode:
    support: none
  platform:
    platforms: posix
requirements:
  - python >= 3.11
  - boto3 >= 1.28
seealso:
  - module: confidential_ml.nitro.enclave_sync
  - module: confidential_ml.nitro.enclave_info
  - module: ansible.builtin.command
"""

EXAMPLES = r"""
- name: Run the owner's algorithm on the dataset the user pushed
  confidential_ml.nitro.enclave_run:
    package: app.pkg
    script: ml_algorithm.py
    args: -m model.h5 -d /dataset/ -o /output/
    expect_pcr0: "{{ owner_pcr0 }}"
  register: job

- name: A long training job, in the background, polled every 30 seconds
  confidential_ml.nitro.enclave_run:
    package: /encrypted/train.pkg
    script: train.py
    args: ["--epochs", "40", "--data", "/dataset", "--out", "/output/model"]
    timeout: 7000
    region: eu-west-1
  async: 7200
  poll: 30
  register: training

- name: Keep the job's receipt
  ansible.builtin.copy:
    content: "{{ training.attestation.document | b64decode }}"
    dest: /srv/receipts/{{ training.job }}.cose
    mode: "0644"

- name: Run against a local-backend enclave by its socket
  confidential_ml.nitro.enclave_run:
    endpoint: unix:///run/confidential-ml/enclaves/16_5000.sock
    package: app.pkg
    script: ml_algorithm.py
    args: -m model.h5 -d /dataset -o /output
"""

RETURN = r"""
rc:
  description: The script's exit status; negative when a signal ended it (V(-9) after a timeout or cancel).
  returned: when the job ran
  type: int
  sample: 0
stdout:
  description: What the script wrote on standard output (decoded as UTF-8, trailing newlines removed).
  returned: when the job ran
  type: str
  sample: classified a.csv 7
stderr:
  description: What the script wrote on standard error (decoded as UTF-8, trailing newlines removed).
  returned: when the job ran
  type: str
  sample: done
stdout_lines:
  description: RV(stdout) split into lines.
  returned: when the job ran
  type: list
  elements: str
  sample: [classified a.csv 7]
stderr_lines:
  description: RV(stderr) split into lines.
  returned: when the job ran
  type: list
  elements: str
  sample: [done]
start:
  description: When the script started, in the managed node's local time.
  returned: when the job ran
  type: str
  sample: "2025-01-31 12:00:00.123456"
end:
  description: When the script ended, in the managed node's local time.
  returned: when the job ran
  type: str
  sample: "2025-01-31 12:00:04.654321"
delta:
  description: How long the script ran.
  returned: when the job ran
  type: str
  sample: "0:00:04.530865"
job:
  description: The job's id, chosen by the enclave.
  returned: when the job ran
  type: str
  sample: 3f9a1c2b7d4e
package:
  description: The package as the enclave ran it (a share path).
  returned: when the job ran
  type: str
  sample: /encrypted/app.pkg
script:
  description: The script that ran.
  returned: when the job ran
  type: str
  sample: ml_algorithm.py
ended_by:
  description: Why the script stopped, V(exit), V(timeout) or V(cancelled).
  returned: when the job ran
  type: str
  sample: exit
outputs:
  description: Every regular file in the share's C(/output) when the job ended (also those from earlier jobs).
  returned: when the job ran
  type: list
  elements: dict
  contains:
    path:
      description: Share path of the file.
      type: str
      sample: /output/results.csv
    size:
      description: Size in bytes.
      type: int
      sample: 2048
    sha256:
      description: SHA-256 of the content (hex).
      type: str
      sample: 0b1c8e2f4a6d9b3c5e7f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f4a6b8c0d
attestation:
  description:
    - The job's receipt, an attestation document the enclave's NSM signed at the end of the job, and its claims.
    - The module verified the document before returning it, against the same roots as O(expect_pcr0) (AWS Nitro
      root G1, and the local backend's root when this host has one); it checked its signature, its certificate
      chain, its age, that PCR0 is one of O(expect_pcr0) when given, and that the enclave is not in debug mode
      unless O(allow_debug). A document that fails any check fails the task.
    - C(user_data) is the receipt domain C(confidential_ml.nitro job receipt v2) and a NUL byte, then the SHA-384
      of RV(attestation.summary) in canonical CBOR (RFC 8949 core deterministic encoding); the module checks that
      it matches. An C(attest) answer signs its user_data in another domain, so it never passes for a receipt.
    - RV(attestation.format), RV(attestation.summary) and
      RV(attestation.document) together are the job's receipt; save them as JSON and check it later with
      C(enclave receipt verify RECEIPT --release release.json --outputs DIR).
  returned: when the job ran
  type: dict
  contains:
    format:
      description: The receipt format.
      type: int
      sample: 2
    document:
      description: The COSE_Sign1 document, base64; C(enclave attestation verify) verifies it again later.
      type: str
      sample: hEShATgioFkRXqlp...
    summary:
      description: The job summary the enclave signed, as it sent it (times as epoch seconds).
      type: dict
      sample: {"job": "3f9a1c2b7d4e", "package": "/encrypted/app.pkg", "script": "ml_algorithm.py", "rc": 0,
               "ended_by": "exit", "start": 1738324800.123456, "end": 1738324804.654321, "outputs": []}
    module_id:
      description: The enclave's id.
      type: str
      sample: i-0123456789abcdef0-enc0123456789abcdef
    timestamp:
      description: When the NSM signed the document, milliseconds since the epoch.
      type: int
      sample: 1738324804654
    time:
      description: The same time, ISO 8601 in UTC.
      type: str
      sample: "2025-01-31T12:00:04.654000+00:00"
    digest:
      description: The PCR digest algorithm.
      type: str
      sample: SHA384
    debug_mode:
      description: Whether the enclave runs in debug mode (all-zero PCRs).
      type: bool
      sample: false
    pcrs:
      description: The enclave's PCRs by index, hex.
      type: dict
      sample: {"0": "7fb5c55bc2ecbb68ed99a13d7122abfc0666b926a79d5379bc58b9445c84217f59cfdd36c08b2c79552928702efe23e4"}
    user_data:
      description: SHA-384 of the job summary (hex), see above.
      type: str
      sample: 4c0a5b0e5e8d3b0a9c3b6d8e1f2a4b6c8d0e2f4a6b8c0d1e3f5a7b9c1d3e5f7a9b1c3d5e7f9a1b3c5d7e9f1a3b5c7d9e1f2a4b
    public_key:
      description: Public key in the document (hex); null for a receipt.
      type: str
      sample: null
    nonce:
      description: Nonce in the document (hex); null for a receipt.
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
msg:
  description: Why the task failed, or, in check mode, what was checked and why the job did not run.
  returned: on failure, and in check mode
  type: str
  sample: non-zero return code
"""

import contextlib
import stat
from datetime import datetime, timedelta

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import IMPORT_ERROR as CLIENT_IMPORT_ERROR
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import host_kms_settings
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.module_options import (
    BOTO3_IMPORT_ERROR,
    ENCLAVE_MUTUALLY_EXCLUSIVE,
    ENCLAVE_OPTIONS,
    ENCLAVE_REQUIRED_BY,
    connect,
    require_libraries,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.receipt import IMPORT_ERROR as RECEIPT_IMPORT_ERROR
from ansible_collections.confidential_ml.nitro.plugins.module_utils.receipt import verify_job_receipt

with contextlib.suppress(ImportError):  # require_libraries(module, BOTO3_IMPORT_ERROR) reports it
    from botocore.exceptions import BotoCoreError

TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def script_args(module):
    """args as the server takes them: a string (split there, like a shell) or a list of strings."""
    value = module.params["args"]
    if value is None:
        return []
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value):
        return [str(a) for a in value]
    module.fail_json(
        msg=f"args must be a string or a list of strings, not {value!r:.200}; quote values that YAML reads as "
        "booleans, maps or lists"
    )


def kms_settings(module):
    """Region and credentials of this host for the job's KMS calls."""
    try:
        return host_kms_settings(region=module.params["region"], profile=module.params["profile"])
    except (EnclaveError, BotoCoreError) as err:
        module.fail_json(
            msg=f"cannot get this host's AWS credentials for KMS: {err}; set region (or AWS_DEFAULT_REGION) and a "
            "profile, environment credentials or an instance role"
        )


def share_path(package):
    """The package's path in the share, as EnclaveClient.run names it."""
    return package if package.startswith("/") else f"/encrypted/{package}"


def check_package(module, client, path):
    """Fail unless path is a regular file in the share."""
    try:
        info = client.stat(path)
    except EnclaveError as err:
        module.fail_json(msg=f"cannot look up package {path} in the enclave's share: {err}")
    if info is None:
        module.fail_json(
            msg=f"package {path} is not in the enclave's share: push it into /encrypted first (enclave_sync)"
        )
    if not stat.S_ISREG(info["mode"]):
        module.fail_json(msg=f"package {path} in the enclave's share is not a regular file; give the package file")


def clock(seconds):
    return datetime.fromtimestamp(seconds).strftime(TIME_FORMAT)


def duration(seconds):
    """H:MM:SS.ffffff, as ansible.builtin.command reports delta."""
    micros = round(timedelta(seconds=max(seconds, 0)) / timedelta(microseconds=1))
    minutes, micros = divmod(micros, 60_000_000)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{micros // 1_000_000:02d}.{micros % 1_000_000:06d}"


def text(data):
    return bytes(data).decode("utf-8", errors="replace").rstrip("\r\n")


def receipt(module, client, summary, result):
    """The job's receipt, verified, with the document's claims; fails the task when it does not verify."""
    try:
        verified = verify_job_receipt(
            summary,
            trusted_roots=client.trusted_roots,
            attested=client.attested,
            allow_debug=module.params["allow_debug"],
        )
    except EnclaveError as err:
        module.fail_json(msg=str(err), **result)
    return {**verified.receipt.to_dict(), **verified.document.to_json()}


def main():
    module = AnsibleModule(
        argument_spec={
            "package": {"type": "str", "required": True},
            "script": {"type": "str", "required": True},
            "args": {"type": "raw", "default": []},
            "timeout": {"type": "float"},
            "clear_output": {"type": "bool", "default": False},
            "region": {"type": "str", "aliases": ["aws_region"]},
            "profile": {"type": "str", "aliases": ["aws_profile"]},
            **ENCLAVE_OPTIONS,
        },
        mutually_exclusive=ENCLAVE_MUTUALLY_EXCLUSIVE,
        required_by=ENCLAVE_REQUIRED_BY,
        supports_check_mode=True,
    )
    require_libraries(module, BOTO3_IMPORT_ERROR, CLIENT_IMPORT_ERROR, RECEIPT_IMPORT_ERROR)
    params = module.params
    if params["timeout"] is not None and params["timeout"] <= 0:
        module.fail_json(msg=f"timeout must be a positive number of seconds, not {params['timeout']:g}")
    args = script_args(module)
    kms = kms_settings(module)

    client = connect(module)
    try:
        if module.check_mode:
            path = share_path(params["package"])
            check_package(module, client, path)
            attested = " and attests an expected PCR0" if client.attested else ""
            module.exit_json(
                changed=False,
                skipped=True,
                msg=f"check mode: package {path} is in the enclave's share{attested}; the job did not run (whether "
                f"{params['script']} is in the package can only be known by running it)",
            )

        stdout, stderr = bytearray(), bytearray()
        streams = {"stdout": stdout, "stderr": stderr}
        try:
            summary = client.run(
                params["package"],
                params["script"],
                args,
                kms=kms,
                on_output=lambda name, data: streams[name].extend(data),
                timeout=params["timeout"],
                clear_output=params["clear_output"],
            )
        except EnclaveError as err:
            module.fail_json(
                msg=f"the job {params['script']} from {params['package']} failed in the enclave: {err}",
                changed=False,
                stdout=text(stdout),
                stderr=text(stderr),
            )

        result = {
            "changed": True,
            "rc": summary["rc"],
            "stdout": text(stdout),
            "stderr": text(stderr),
            "start": clock(summary["start"]),
            "end": clock(summary["end"]),
            "delta": duration(summary["end"] - summary["start"]),
            "job": summary["job"],
            "package": summary["package"],
            "script": summary["script"],
            "ended_by": summary["ended_by"],
            "outputs": summary["outputs"],
        }
        result["stdout_lines"] = result["stdout"].splitlines()
        result["stderr_lines"] = result["stderr"].splitlines()
        result["attestation"] = receipt(module, client, summary, result)
    finally:
        client.close()

    if result["ended_by"] == "timeout":
        module.fail_json(
            msg=f"the job ran longer than its timeout of {params['timeout']:g} s and was killed; raise timeout or "
            "make the script faster",
            **result,
        )
    if result["ended_by"] == "cancelled":
        module.fail_json(
            msg="the job was cancelled before its script ended (the enclave server lost this connection or was "
            "asked to stop); run it again",
            **result,
        )
    if result["rc"] != 0:
        module.fail_json(msg="non-zero return code", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
