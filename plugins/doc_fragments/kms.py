# Copyright: confidential_ml.nitro developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The connection options every module that talks to KMS shares."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  kms_endpoint_url:
    description:
      - URL of the KMS endpoint, for example V(http://127.0.0.1:4566) for the local KMS of the local backend
        (C(enclave kms serve)).
      - When not set, boto3 chooses the endpoint itself (E(AWS_ENDPOINT_URL_KMS), E(AWS_ENDPOINT_URL), the
        profile's C(endpoint_url), else AWS KMS in O(region)).
    type: str
    aliases: [endpoint_url]
  region:
    description:
      - The AWS region of the key.
      - When not set, boto3 reads E(AWS_DEFAULT_REGION) or the profile's region (botocore does not read
        E(AWS_REGION)).
    type: str
    aliases: [aws_region]
  profile:
    description:
      - A named profile from the AWS shared configuration and credentials files.
      - Cannot be combined with O(access_key), O(secret_key) or O(session_token).
    type: str
    aliases: [aws_profile]
  access_key:
    description:
      - AWS access key id.
      - When not set, boto3 finds credentials itself (environment, profile, instance role).
      - With the local KMS, the access key id names the caller (V(owner) is the role C(owner)).
      - Not hidden from output (it is an identifier, not a secret, and hiding it would mask it inside every
        principal ARN that contains it); O(secret_key) and O(session_token) are.
    type: str
    aliases: [aws_access_key_id, aws_access_key]
  secret_key:
    description:
      - AWS secret access key, used with O(access_key).
    type: str
    aliases: [aws_secret_access_key, aws_secret_key]
  session_token:
    description:
      - AWS session token for temporary credentials, used with O(access_key) and O(secret_key).
    type: str
    aliases: [aws_session_token]
requirements:
  - boto3 >= 1.34
  - botocore >= 1.34
notes:
  - The KMS options follow the conventions of the C(amazon.aws) collection; anything not set here is found by
    boto3 in the usual places (environment variables, shared configuration, instance metadata).
"""
