"""What the collection's modules share: option specs, the clients made from them, library checks.

The options are documented once, in the doc fragments: KMS_OPTIONS in
plugins/doc_fragments/kms.py, ENCLAVE_OPTIONS in plugins/doc_fragments/enclave.py.
BACKEND_OPTIONS is documented by each module that takes it. Only modules import
this file; the CLI and the enclave server do not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import traceback
from typing import Any, NoReturn, Protocol

from ansible.module_utils.basic import missing_required_lib

from .client import EnclaveClient, default_trusted_roots, expected_pcr0
from .errors import EnclaveError
from .runtime import resolve_endpoint
from .settings import kms_client as settings_kms_client

# boto3 is only looked for here, so that require_libraries can name it; settings.kms_client imports it when a
# module makes a KMS client. Importing it costs a task ~0.2 s of CPU, and most tasks (enclave_sync) never use it.
BOTO3_IMPORT_ERROR: ImportError | None = (
    None if importlib.util.find_spec("boto3") else ModuleNotFoundError("No module named 'boto3'", name="boto3")
)


class Module(Protocol):
    """What these helpers use of an AnsibleModule (ansible-core ships no types): fail_json exits."""

    params: dict[str, Any]

    def fail_json(self, msg: str, **kwargs: Any) -> NoReturn: ...


def require_libraries(module, *import_errors):
    """Fail the task, naming the library, when a module_utils file could not import one it needs.

    import_errors: the IMPORT_ERROR of each module_utils file the module uses (None when all was found).
    """
    for error in import_errors:
        if error is not None:
            module.fail_json(
                msg=missing_required_lib(error.name or str(error)),
                exception="".join(traceback.format_exception(error)),
            )


# --- KMS (doc fragment confidential_ml.nitro.kms) ---------------------------------------------

KMS_OPTIONS = {
    "kms_endpoint_url": {"type": "str", "aliases": ["endpoint_url"]},
    "region": {"type": "str", "aliases": ["aws_region"]},
    "profile": {"type": "str", "aliases": ["aws_profile"]},
    "access_key": {"type": "str", "aliases": ["aws_access_key_id", "aws_access_key"], "no_log": False},
    "secret_key": {"type": "str", "aliases": ["aws_secret_access_key", "aws_secret_key"], "no_log": True},
    "session_token": {"type": "str", "aliases": ["aws_session_token"], "no_log": True},
}
KMS_MUTUALLY_EXCLUSIVE = [("profile", "access_key"), ("profile", "secret_key"), ("profile", "session_token")]


def kms_client(module):
    """A boto3 KMS client from the module's KMS options (settings.kms_client); fails the task saying what to set."""
    from botocore.exceptions import BotoCoreError  # with boto3 (require_libraries has checked it is there)

    params = module.params
    try:
        return settings_kms_client(
            endpoint_url=params["kms_endpoint_url"],
            region=params["region"],
            profile=params["profile"],
            access_key=params["access_key"],
            secret_key=params["secret_key"],
            session_token=params["session_token"],
        )
    except EnclaveError as err:
        module.fail_json(msg=f"cannot set up a KMS client: {err}")
    except (BotoCoreError, ValueError) as err:
        module.fail_json(msg=f"cannot set up a KMS client: {err}; check kms_endpoint_url and the other KMS options")


# --- the enclave server (doc fragment confidential_ml.nitro.enclave) --------------------------

ENCLAVE_OPTIONS = {
    "endpoint": {"type": "str"},
    "cid": {"type": "int"},
    "port": {"type": "int"},
    "expect_pcr0": {"type": "list", "elements": "str"},
    "release": {"type": "path"},
    "no_attestation": {"type": "bool", "default": False},
    "allow_debug": {"type": "bool", "default": False},
}
ENCLAVE_MUTUALLY_EXCLUSIVE = [("endpoint", "cid"), ("endpoint", "port")]
ENCLAVE_REQUIRED_BY = {"port": ("cid",)}


def enclave_endpoint(module) -> str:
    """The enclave server's address the options name (else ENCLAVE_ENDPOINT); EnclaveError when none does."""
    params = module.params
    return resolve_endpoint(params["endpoint"], cid=params["cid"], port=params["port"])


def enclave_pcr0(module: Module, *, required: bool = True) -> list[str] | None:
    """The PCR0 values the enclave must attest: expect_pcr0, else release's image, else None with
    no_attestation; fails the task when none is given and required (a module that sends data) or one is bad."""
    params = module.params
    if not required and params["expect_pcr0"] is None and params["release"] is None:
        return None
    try:
        return expected_pcr0(
            params["expect_pcr0"],
            params["release"],
            params["no_attestation"],
            names=("expect_pcr0:", "release:", "no_attestation: true"),
        )
    except EnclaveError as err:
        module.fail_json(msg=str(err))


def enclave_client(module, endpoint: str, *, required: bool = True) -> EnclaveClient:
    """A client of the enclave server at endpoint, attested first (enclave_pcr0 says against what).

    Raises EnclaveError when nobody answers there, AttestationError when the enclave is not one expected."""
    params = module.params
    return EnclaveClient(
        endpoint,
        expect_pcr0=enclave_pcr0(module, required=required),
        trusted_roots=default_trusted_roots(),
        allow_debug=params["allow_debug"],
    )


def connect(module: Module) -> EnclaveClient:
    """enclave_client at enclave_endpoint; fails the task with the reason when either fails."""
    try:
        return enclave_client(module, enclave_endpoint(module))
    except EnclaveError as err:
        module.fail_json(msg=str(err))


# --- the runtime (documented by each module) ---------------------------------------------------

BACKEND_OPTIONS = {"backend": {"type": "str", "choices": ["local", "nitro"]}}


def image_sha256(path: str) -> str:
    """SHA-256 (hex) of an enclave image file: what enclave_image records and enclave_instance compares."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
