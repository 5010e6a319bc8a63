#!/usr/bin/python
# Copyright: confidential_ml.nitro developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION, EXAMPLES and RETURN before the imports)

from __future__ import annotations

DOCUMENTATION = r"""
module: enclave_package
short_description: Seal a directory into an encrypted package that only an attested enclave can open
version_added: 0.1.0
description:
  - Seals the directory O(src) (the owner's confidential code, models and data) into the package file O(dest),
    encrypted under a fresh data key from KMS C(GenerateDataKey) with the key O(key_id). Only an enclave that the
    key policy allows (see M(confidential_ml.nitro.enclave_key_policy)) can unwrap that data key and open the
    package.
  - The package's header is not encrypted (but authenticated); it names the package, its version, the key, the
    encryption context and the digest of the content manifest (every path, mode, size and SHA-256 of O(src)).
  - Idempotent by content. When O(dest) is already a package whose header has the manifest digest of O(src) as
    it is now, the same O(name), O(version), encryption context and key, the module reports no change and calls
    KMS not at all when O(key_id) is a key id or key ARN (with an alias, only C(DescribeKey), to learn which key
    the alias names now).
  - Otherwise it seals again. A package is written to a temporary file beside O(dest) and renamed over it only
    when complete.
author:
  - confidential_ml.nitro developers (@confidential-ml)
options:
  src:
    description:
      - The directory to seal, on the managed node. Only regular files and directories; links and special files
        are refused.
    type: path
    required: true
  dest:
    description:
      - The package file to write, on the managed node. Its directory must exist.
      - If it exists and is not a package, the module fails unless O(force=true).
    type: path
    required: true
  key_id:
    description:
      - The KMS key, as a key id, key ARN, alias name (V(alias/...)) or alias ARN. The header records the key ARN.
    type: str
    required: true
  name:
    description:
      - The package name, recorded in the header and bound into the KMS encryption context as
        C(confidential_ml:package).
    type: str
    required: true
  version:
    description:
      - The package version, recorded in the header and bound into the KMS encryption context as
        C(confidential_ml:version).
    type: str
    required: true
  encryption_context:
    description:
      - Additional KMS encryption context (text to text), recorded in the header. Key policies can require it
        with C(kms:EncryptionContext:<key>) conditions.
      - Must not set C(confidential_ml:package) or C(confidential_ml:version) to anything but O(name) and
        O(version).
    type: dict
    default: {}
  signing_key_id:
    description:
      - The owner's KMS signing key (key id, ARN or alias; C(ECC_NIST_P384), C(SIGN_VERIFY)) that signs the header
        (KMS C(Sign), C(ECDSA_SHA_384)), which makes a package of format 2. An image built with this key in
        O(confidential_ml.nitro.enclave_image#module:owner_signing_keys) runs only packages it signed.
      - When not set, the package is unsigned (format 1), which only unbound development images run.
      - A package signed by another key (or unsigned) is sealed again.
    type: str
  force:
    description:
      - Seal again even when O(dest) is up to date (for example to rotate the data key), and overwrite O(dest)
        when it is not a package.
    type: bool
    default: false
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - confidential_ml.nitro.kms
attributes:
  check_mode:
    support: full
    details: Hashes O(src) and reads the header of O(dest); asks KMS for no data key and writes nothing.
  diff_mode:
    support: full
    details: A summary of the package header before and after (name, version, key, encryption context, manifest digest).
  platform:
    platforms: posix
requirements:
  - python >= 3.11
  - cbor2 >= 6.2
  - tink >= 1.10
  - tqdm >= 4.60
seealso:
  - module: confidential_ml.nitro.enclave_key_policy
"""

EXAMPLES = r"""
- name: Seal the application under the owner's key
  confidential_ml.nitro.enclave_package:
    src: /srv/owner/app
    dest: /srv/owner/publish/app.pkg
    key_id: alias/confidential-ml
    name: app
    version: "1.4.0"

- name: Seal against the local KMS of the local backend, binding a customer id into the encryption context
  confidential_ml.nitro.enclave_package:
    src: "{{ playbook_dir }}/app"
    dest: "{{ playbook_dir }}/app.pkg"
    key_id: "{{ key_arn }}"
    name: app
    version: "1.4.0"
    encryption_context:
      customer: acme
    kms_endpoint_url: http://127.0.0.1:4566
    region: us-east-1
    access_key: owner
    secret_key: "{{ local_kms_secret }}"

- name: Seal again with a fresh data key even though nothing changed
  confidential_ml.nitro.enclave_package:
    src: /srv/owner/app
    dest: /srv/owner/publish/app.pkg
    key_id: alias/confidential-ml
    name: app
    version: "1.4.0"
    force: true
"""

RETURN = r"""
dest:
  description: The package file.
  returned: always
  type: str
  sample: /srv/owner/publish/app.pkg
manifest_digest:
  description: SHA-256 (hex) of the content manifest of O(src); equal directory trees give equal digests.
  returned: always
  type: str
  sample: 9f2c0d3b1e5a7c4f8d6b2a1e0c9f7d5b3a1e9c7f5d3b1a9e7c5f3d1b9a7e5c3f
header:
  description:
    - The header of the package at O(dest) after the run.
    - In check mode, when the package would be sealed again, the header it would get, with the O(key_id) as
      given and no C(wrapped_key) (KMS is not asked for a data key).
  returned: always
  type: dict
  contains:
    format_version:
      description: Package format version.
      type: int
      sample: 1
    name:
      description: Package name.
      type: str
      sample: app
    version:
      description: Package version.
      type: str
      sample: "1.4.0"
    key_id:
      description: ARN of the KMS key that wrapped the data key.
      type: str
      sample: arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab
    encryption_context:
      description: The full KMS encryption context, including C(confidential_ml:package) and C(confidential_ml:version).
      type: dict
      sample: {"confidential_ml:package": "app", "confidential_ml:version": "1.4.0"}
    wrapped_key:
      description: The data key as KMS encrypted it (base64); useless without KMS and an allowed enclave.
      type: str
      sample: AQIDAHh...
    manifest_digest:
      description: SHA-256 (hex) of the content manifest.
      type: str
      sample: 9f2c0d3b1e5a7c4f8d6b2a1e0c9f7d5b3a1e9c7f5d3b1a9e7c5f3d1b9a7e5c3f
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.module_options import (
    BOTO3_IMPORT_ERROR,
    KMS_MUTUALLY_EXCLUSIVE,
    KMS_OPTIONS,
    kms_client,
    require_libraries,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import KmsSigner
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_seal import (
    IMPORT_ERROR as PACKAGE_IMPORT_ERROR,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_seal import needs_seal, seal


def summary(header):
    """What the diff shows of a header: everything but the wrapped key (new at every seal)."""
    if header is None:
        return ""
    fields = {key: value for key, value in header.items() if key not in ("wrapped_key", "signer")}
    if header.get("signer"):  # the signature is new at every seal too
        fields["signer"] = {key: value for key, value in header["signer"].items() if key != "signature"}
    return json.dumps(fields, indent=2, sort_keys=True) + "\n"


def main():
    module = AnsibleModule(
        argument_spec={
            "src": {"type": "path", "required": True},
            "dest": {"type": "path", "required": True},
            "key_id": {"type": "str", "required": True},
            "name": {"type": "str", "required": True},
            "version": {"type": "str", "required": True},
            "encryption_context": {"type": "dict", "default": {}},
            "force": {"type": "bool", "default": False},
            "signing_key_id": {"type": "str", "no_log": False},
            **KMS_OPTIONS,
        },
        mutually_exclusive=KMS_MUTUALLY_EXCLUSIVE,
        supports_check_mode=True,
    )
    require_libraries(module, BOTO3_IMPORT_ERROR, PACKAGE_IMPORT_ERROR)
    params = module.params
    src, dest = params["src"], params["dest"]
    if not os.path.isdir(src):
        module.fail_json(msg=f"src {src} is not a directory; give the directory to seal.")
    nested = sorted(str(key) for key, value in params["encryption_context"].items() if isinstance(value, (dict, list)))
    if nested:
        module.fail_json(msg=f"encryption_context maps {nested} to lists or dicts; KMS takes only text values.")
    context = {str(key): str(value) for key, value in params["encryption_context"].items()}

    try:
        # The signing key's public half (KMS GetPublicKey), also in check mode: which key signed decides the change.
        signer = KmsSigner(kms_client(module), params["signing_key_id"]) if params["signing_key_id"] else None
        check = needs_seal(
            src,
            dest,
            key_id=params["key_id"],
            name=params["name"],
            version=params["version"],
            encryption_context=context,
            signer=signer,
            kms=lambda: kms_client(module),
            force=params["force"],
        )
    except EnclaveError as err:
        module.fail_json(msg=str(err))
    except OSError as err:
        module.fail_json(msg=f"cannot read src {src}: {err}; check that it is readable.")

    before, wanted, changed = check.before, check.wanted, check.needed
    if not changed:
        after = before
    elif module.check_mode:
        after = wanted
    else:
        try:
            after = seal(
                src,
                dest,
                kms_client=kms_client(module),
                key_id=params["key_id"],
                name=params["name"],
                version=params["version"],
                encryption_context=context,
                signer=signer,
            ).to_json()
        except EnclaveError as err:
            module.fail_json(msg=str(err))

    result = {"changed": changed, "dest": dest, "manifest_digest": after["manifest_digest"], "header": after}
    if module._diff:
        result["diff"] = {
            "before_header": dest,
            "after_header": dest,
            "before": summary(before),
            "after": summary(after),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
