# Copyright: confidential_ml.nitro developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The connection options every module that talks to the enclave server shares."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  endpoint:
    description:
      - Where the enclave server listens, V(vsock://CID:PORT) on the C(nitro) backend (the CID that
        C(nitro-cli describe-enclaves) reports as C(EnclaveCID)) or V(unix:///PATH) on the C(local) backend.
      - When not set, E(ENCLAVE_ENDPOINT), else V(vsock://CID:PORT) from O(cid) and O(port), else the one running
        enclave of the backend that E(ENCLAVE_BACKEND) names (default C(local)), as C(nitro-cli describe-enclaves)
        lists it on C(nitro) and the installed C(enclave local describe-enclaves) on C(local).
        E(ENCLAVE_ENDPOINT) is read before O(cid), so unset it when you choose the enclave by O(cid).
      - The module fails when none of these names an enclave, or when several enclaves are running.
    type: str
  cid:
    description:
      - The enclave's CID, when O(endpoint) is not given; the module connects to V(vsock://CID:PORT).
    type: int
  port:
    description:
      - The server's vsock port, with O(cid).
      - When not set, V(5000), the port the enclave server listens on by default.
    type: int
  expect_pcr0:
    description:
      - The enclave image measurements (PCR0, 96 hex characters as C(nitro-cli build-enclave) prints them) that
        this host trusts.
      - When set, the module first asks the enclave for a fresh attestation document (with a random nonce) and
        verifies its signature, its certificate chain to a trusted root (AWS Nitro root G1, and the local
        backend's root when this host has one) and that its PCR0 is one of these values; if any check fails it
        fails and sends nothing else (no file, no data, no job).
      - A single value may be given as a string. An empty value is an error, never "no check".
      - M(confidential_ml.nitro.enclave_sync) and M(confidential_ml.nitro.enclave_run) send nothing unless one of
        O(expect_pcr0), O(release) or O(no_attestation=true) is given.
        M(confidential_ml.nitro.enclave_info) only reads, and checks the PCR0 only when one of the first two is
        given; documents the enclave returns (such as the job receipt of M(confidential_ml.nitro.enclave_run))
        are still verified against the trusted roots.
    type: list
    elements: str
  release:
    description:
      - The owner's release manifest (C(release.json), as the C(confidential_ml.nitro.owner_pipeline) role
        publishes it). The enclave must attest the PCR0 of its image (C(image.measurements.pcr0)).
      - Instead of O(expect_pcr0).
    type: path
  no_attestation:
    description:
      - Send files and jobs to the enclave without checking which image it runs. Anything on the host could then
        pose as the enclave and receive the data.
      - Required when neither O(expect_pcr0) nor O(release) is given, so that nothing is sent unattested by
        accident.
    type: bool
    default: false
  allow_debug:
    description:
      - Accept an enclave that runs in debug mode (it attests all-zero PCRs, and the host can read its memory and
        console). For development only; with it, O(expect_pcr0) cannot match a real measurement.
    type: bool
    default: false
requirements:
  - cbor2 >= 5.6
  - cryptography >= 42
notes:
  - The module connects to the enclave server from the managed node, over AF_VSOCK (C(nitro)) or an AF_UNIX
    socket (C(local)); it usually needs root, who owns the enclave's socket.
"""
