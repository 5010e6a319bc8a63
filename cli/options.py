"""Command-line options several `enclave` commands share, and what they build."""

LIB = "ansible_collections.confidential_ml.nitro.plugins.module_utils"


def kms_client(args):
    """A boto3 KMS client configured the boto3 way (env, profiles), unless a flag names the endpoint."""
    from importlib import import_module

    settings = import_module(f"{LIB}.settings")
    return settings.kms_client(endpoint_url=args.kms_endpoint, region=args.region, profile=args.profile)


def add_kms_flags(parser) -> None:
    group = parser.add_argument_group("KMS (defaults come from boto3: AWS_ENDPOINT_URL_KMS, AWS_PROFILE, ...)")
    group.add_argument("--kms-endpoint", metavar="URL", help="KMS endpoint URL (e.g. the local KMS)")
    group.add_argument("--region", help="AWS region")
    group.add_argument("--profile", help="AWS profile")
