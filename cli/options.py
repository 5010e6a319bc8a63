"""Command-line options several `enclave` commands share, and what they build."""

import os

LIB = "ansible_collections.confidential_ml.nitro.plugins.module_utils"
# What names a KMS endpoint to boto3 besides --kms-endpoint (botocore's service-specific and global variables).
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL")


def kms_client(args):
    """A boto3 KMS client configured the boto3 way (env, profiles), unless a flag names the endpoint.

    On the local backend, while the local cloud runs and neither --kms-endpoint, AWS_ENDPOINT_URL(_KMS) nor
    --region names another, it is the local KMS, in its region: the KMS the local enclaves ask (as `enclave
    run` reaches it), never real AWS by accident. Whose credentials stays boto3's choice (AWS_PROFILE)."""
    from importlib import import_module

    settings = import_module(f"{LIB}.settings")
    errors = import_module(f"{LIB}.errors")
    endpoint, region, cloud = args.kms_endpoint, args.region, None
    named = endpoint or region or any(os.environ.get(name) for name in ENDPOINT_VARIABLES)
    if not named and settings.backend() == "local":
        local = import_module("ansible_collections.confidential_ml.nitro.enclave_local.cloud")
        cloud = local.status()
        if cloud is not None:
            endpoint, region = cloud["kms_endpoint_url"], local.KMS_REGION
    try:
        return settings.kms_client(endpoint_url=endpoint, region=region, profile=args.profile)
    except errors.EnclaveError as err:
        if cloud is not None and "credentials" in str(err):
            raise errors.EnclaveError(
                f"the local KMS at {endpoint} needs the credentials it issued: "
                'eval "$(enclave local env --profile owner)" (or AWS_PROFILE=owner with '
                f"AWS_SHARED_CREDENTIALS_FILE={cloud['kms_credentials']})"
            ) from None
        if cloud is None and str(err).startswith("no AWS region") and settings.backend() == "local":
            hint = "or start the local cloud (`enclave local up`), which is then used"
            raise errors.EnclaveError(f"{err}; {hint}") from None
        raise


def add_kms_flags(parser) -> None:
    group = parser.add_argument_group(
        "KMS (defaults come from boto3: AWS_ENDPOINT_URL_KMS, AWS_PROFILE, ...; on the local backend, the running "
        "local cloud's KMS)"
    )
    group.add_argument("--kms-endpoint", metavar="URL", help="KMS endpoint URL (e.g. the local KMS)")
    group.add_argument("--region", help="AWS region")
    group.add_argument("--profile", help="AWS profile")
