#!/usr/bin/python
# Copyright: confidential_ml.nitro developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION, EXAMPLES and RETURN before the imports)

from __future__ import annotations

DOCUMENTATION = r"""
module: enclave_image
short_description: Build the enclave image and return its measurements (PCR0, PCR1, PCR2, PCR8)
version_added: 0.1.0
description:
  - Builds the enclave image at O(output) with the O(backend)'s builder and returns its measurements. PCR0 is the
    value the owner writes into the KMS key policy (M(confidential_ml.nitro.enclave_key_policy)) and the user
    expects from the enclave (O(confidential_ml.nitro.enclave_run#module:expect_pcr0)).
  - On V(nitro), C(nitro-cli build-enclave) turns a Docker build directory or image into an EIF (it needs Docker);
    on V(local), the local builder writes a reproducible archive of the enclave server code.
  - Beside the image, the module keeps a measurements file, O(output) with C(.json) appended, that records the
    image's SHA-256 and measurements.
  - Idempotent by measurement. The builders expose no digest of their inputs, and the runtimes cannot measure an
    existing image, so the module always builds, into a temporary file beside O(output), and compares the new
    measurements with those the measurements file records for the image now at O(output). When they are equal the
    new build is discarded and the task reports no change (the image keeps its bytes, even if a new EIF would
    differ in parts that no PCR covers, such as its build-time metadata). Otherwise the new image replaces
    O(output) (by a rename, so O(output) is never half written) and the measurements file is rewritten.
  - An image without a measurements file, or one whose SHA-256 no longer matches it, counts as unknown and is
    replaced.
  - A build takes as long as it takes each time (minutes with C(nitro-cli) and Docker; well under a second on
    V(local)).
author:
  - confidential_ml.nitro developers (@confidential-ml)
options:
  output:
    description:
      - The image file to write, on the managed node. Its directory must exist.
    type: path
    required: true
  source:
    description:
      - What to build from.
      - On V(nitro), a directory with a C(Dockerfile) at its top, or a Docker image URI.
      - On V(local), a directory that holds C(enclave_server/) and C(plugins/module_utils/) (a checkout of this
        collection).
      - When not set, this collection's own enclave server.
    type: str
  owner_signing_keys:
    description:
      - The owner's KMS package-signing keys (key id, ARN or alias; C(ECC_NIST_P384), C(SIGN_VERIFY)). Their public
        keys (read with KMS C(GetPublicKey)) are built into the image as C(owner_identity.json), so PCR0 measures
        them, and the enclave runs only packages one of them signed (M(confidential_ml.nitro.enclave_package)
        O(confidential_ml.nitro.enclave_package#module:signing_key_id)). List several to rotate.
      - Required to build this collection's own image on V(nitro) (O(source) not set). Without it the V(local)
        image is a development image that runs packages from anyone.
    type: list
    elements: str
    default: []
  signing_certificate:
    description:
      - A certificate (PEM) to sign the image with, which gives it a PCR8; with O(private_key). V(nitro) only.
    type: path
  private_key:
    description:
      - The private key of O(signing_certificate), a PEM file or the ARN of a KMS key
        (C(arn:aws:kms:REGION:ACCOUNT:key/KEY-ID)). With an ARN nitro-cli signs through KMS with the host's
        credentials, which need C(kms:Sign) and C(kms:GetPublicKey) on the key. V(nitro) only.
    type: path
  backend:
    description:
      - V(nitro) builds an EIF with C(nitro-cli) (on a host with the Nitro Enclaves CLI and Docker), V(local) a
        local-backend image.
      - When not set, E(ENCLAVE_BACKEND), else V(local).
    type: str
    choices: [local, nitro]
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - confidential_ml.nitro.kms
attributes:
  check_mode:
    support: full
    details:
      - Builds into a temporary directory and deletes the result, to report the measurements the image would have
        and whether O(output) would change; O(output) and its measurements file are not touched. On V(nitro) this
        runs C(nitro-cli) and Docker (whose build cache may grow).
  diff_mode:
    support: full
    details: The measurements before and after, as JSON.
  platform:
    platforms: posix
requirements:
  - python >= 3.11
  - nitro-cli and Docker, with O(backend=nitro)
seealso:
  - module: confidential_ml.nitro.enclave_key_policy
  - module: confidential_ml.nitro.enclave_info
  - name: Building an enclave image file
    description: nitro-cli build-enclave, measurements and signing.
    link: https://docs.aws.amazon.com/enclaves/latest/user/building-eif.html
"""

EXAMPLES = r"""
- name: Build the enclave image on a Nitro parent instance, bound to the owner's signing key
  confidential_ml.nitro.enclave_image:
    backend: nitro
    output: /srv/owner/release/enclave.eif
    owner_signing_keys: [alias/confidential-ml-signing]
  register: image

- name: Allow its measurement in the key policy
  confidential_ml.nitro.enclave_key_policy:
    key_id: alias/confidential-ml
    account_id: "111122223333"
    user_principals: [arn:aws:iam::111122223333:role/enclave-host]
    pcr0: ["{{ image.measurements.pcr0 }}"]

- name: A signed image from the owner's own Docker build directory
  confidential_ml.nitro.enclave_image:
    backend: nitro
    source: /srv/owner/enclave-docker
    output: /srv/owner/release/enclave.eif
    signing_certificate: /srv/owner/keys/image-signing.crt
    private_key: /srv/owner/keys/image-signing.key

- name: The local backend's image, for development and CI
  confidential_ml.nitro.enclave_image:
    backend: local
    output: "{{ playbook_dir }}/build/enclave.img"
"""

RETURN = r"""
owner_signing_keys:
  description: The owner's signing keys built into the image (empty for an unbound development image).
  returned: always
  type: list
  elements: dict
  contains:
    key_id:
      description: The signing key's ARN.
      type: str
    public_key:
      description: Its public key, DER SubjectPublicKeyInfo in base64.
      type: str
    fingerprint:
      description: SHA-256 of the DER public key, hex; package headers name their signer by it.
      type: str
image:
  description: The image file, as an absolute path.
  returned: always
  type: str
  sample: /srv/owner/release/enclave.eif
measurements_file:
  description: The file beside the image that records its SHA-256 and measurements.
  returned: always
  type: str
  sample: /srv/owner/release/enclave.eif.json
backend:
  description: The backend that built the image.
  returned: always
  type: str
  sample: nitro
measurements:
  description: The image's measurements, SHA-384 as lowercase hex (in check mode, those it would have).
  returned: always
  type: dict
  contains:
    pcr0:
      description: The image measurement, which key policies compare with C(kms:RecipientAttestation:ImageSha384).
      type: str
      sample: 7fb5c55bc2ecbb68ed99a13d7122abfc0666b926a79d5379bc58b9445c84217f59cfdd36c08b2c79552928702efe23e4
    pcr1:
      description: The kernel and boot ramfs (on V(local), the runtime the code runs on).
      type: str
      sample: 235c9e6050abf6b993c915505f3220e2d82b51aff830ad14cbecc2eec1bf0b4ae749d311c663f464cde9f718acca5286
    pcr2:
      description: The application.
      type: str
      sample: 0f0ac32c300289e872e6ac4d19b0b5ac4a9b020c98295643ff3978610750ce6a86f7edff24e3c0a4a445f2ff8a9ea79d
    pcr8:
      description: The signing certificate, for a signed image; null otherwise.
      type: str
      sample: null
"""

import dataclasses
import json
import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.module_options import (
    BACKEND_OPTIONS,
    BOTO3_IMPORT_ERROR,
    KMS_MUTUALLY_EXCLUSIVE,
    KMS_OPTIONS,
    image_sha256,
    kms_client,
    require_libraries,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import (
    IDENTITY_FILE,
    OwnerIdentity,
    owner_key_from_kms,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import (
    IMPORT_ERROR as OWNER_IMPORT_ERROR,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.runtime import get_runtime

RECORD_FORMAT = 1


def recorded(module, output, record):
    """The measurements the record file holds for the image now at output, or None when they are unknown."""
    if not os.path.isfile(output) or not os.path.isfile(record):
        return None
    try:
        with open(record) as f:
            data = json.load(f)
        if data.get("format") != RECORD_FORMAT or data.get("image_sha256") != image_sha256(output):
            return None
        return data["measurements"]
    except (ValueError, KeyError, AttributeError):
        return None
    except OSError as err:
        module.fail_json(msg=f"cannot read {output} or {record}: {err}; check their permissions")


def write_record(output, record, backend, measurements):
    data = {
        "format": RECORD_FORMAT,
        "image": os.path.basename(output),
        "image_sha256": image_sha256(output),
        "backend": backend,
        "measurements": measurements,
    }
    tmp = f"{record}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, record)


def summary(measurements):
    return "" if measurements is None else json.dumps(measurements, indent=2, sort_keys=True) + "\n"


def main():
    module = AnsibleModule(
        argument_spec={
            "output": {"type": "path", "required": True},
            "source": {"type": "str"},
            "signing_certificate": {"type": "path"},
            "private_key": {"type": "path", "no_log": False},
            "owner_signing_keys": {"type": "list", "elements": "str", "default": [], "no_log": False},
            **BACKEND_OPTIONS,
            **KMS_OPTIONS,
        },
        required_together=[("signing_certificate", "private_key")],
        mutually_exclusive=KMS_MUTUALLY_EXCLUSIVE,
        supports_check_mode=True,
    )
    params = module.params
    output = os.path.abspath(params["output"])
    record = output + ".json"
    directory = os.path.dirname(output)
    if os.path.isdir(output):
        module.fail_json(msg=f"output {output} is a directory; give the path of the image file to write")
    if not module.check_mode and not os.path.isdir(directory):
        module.fail_json(msg=f"cannot write {output}: create the directory {directory} first")

    try:
        runtime = get_runtime(params["backend"])
    except EnclaveError as err:
        module.fail_json(msg=str(err))
    backend = getattr(runtime, "backend", params["backend"])
    before = recorded(module, output, record)

    # Beside output, so that the new image is renamed into place; in check mode, away from it.
    workdir = tempfile.mkdtemp(prefix=".enclave-image-", dir=None if module.check_mode else directory)
    owner = None
    try:
        try:
            if params["owner_signing_keys"]:
                require_libraries(module, BOTO3_IMPORT_ERROR, OWNER_IMPORT_ERROR)
                kms = kms_client(module)
                owner = OwnerIdentity(tuple(owner_key_from_kms(kms, key) for key in params["owner_signing_keys"]))
                with open(os.path.join(workdir, IDENTITY_FILE), "wb") as f:
                    f.write(owner.dumps())
            built = runtime.build(
                output=os.path.join(workdir, os.path.basename(output)),
                source=params["source"],
                signing_certificate=params["signing_certificate"],
                private_key=params["private_key"],
                owner_identity=os.path.join(workdir, IDENTITY_FILE) if owner else None,
            )
        except EnclaveError as err:
            module.fail_json(msg=f"building the enclave image failed: {err}")
        after = dataclasses.asdict(built.measurements)
        changed = after != before
        if changed and not module.check_mode:
            try:
                os.replace(built.image, output)
                write_record(output, record, backend, after)
            except OSError as err:
                module.fail_json(msg=f"cannot write {output} or {record}: {err}; check the directory's permissions")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "changed": changed,
        "image": output,
        "measurements_file": record,
        "backend": backend,
        "measurements": after,
        "owner_signing_keys": [key.to_json() for key in owner.keys] if owner else [],
    }
    if module._diff:
        result["diff"] = {
            "before_header": record,
            "after_header": record,
            "before": summary(before),
            "after": summary(after),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
