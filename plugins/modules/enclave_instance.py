#!/usr/bin/python
# Copyright: confidential_ml.nitro developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION, EXAMPLES and RETURN before the imports)

from __future__ import annotations

DOCUMENTATION = r"""
module: enclave_instance
short_description: Keep an enclave running from a given image with given resources, or absent
version_added: 0.1.0
description:
  - Runs the enclave image O(image) as the enclave named O(name), through the backend's runtime (C(nitro-cli) on
    V(nitro), the local runtime on V(local)).
  - Idempotent. An enclave of that name that runs the same image (by SHA-256 of the image file) with the same
    CPU count, memory, CID (when given) and debug mode is left alone; otherwise it is terminated and started
    again, so the enclave restarts only when its image or its resources changed.
  - Memory is compared as nitro-cli allocates it, in whole hugepages; C(describe-enclaves) reports what was
    allocated, which can exceed O(memory_mib) (up to one hugepage of the host's largest size, e.g. 1024 MiB for a
    1000 MiB request served from 1 GiB pages). Such an enclave already has the memory asked for and is left alone.
  - The image an enclave was started from is recorded under the project's state directory
    (C($ENCLAVE_HOME/instances/NAME.json)), because neither runtime reports it.
author:
  - confidential_ml.nitro developers (@confidential-ml)
options:
  name:
    description: The enclave's name.
    type: str
    required: true
  image:
    description: The enclave image file (an EIF on V(nitro)). Required with O(state=running).
    type: path
  backend:
    description: The runtime. Defaults to the E(ENCLAVE_BACKEND) environment variable, else V(local).
    type: str
    choices: [local, nitro]
  cpu_count:
    description: vCPUs for the enclave.
    type: int
    default: 2
  memory_mib:
    description: Memory for the enclave in MiB (on V(nitro) at least 4x the EIF).
    type: int
    default: 1024
  cid:
    description: The enclave's CID; assigned by the runtime when not given.
    type: int
  debug_mode:
    description:
      - Start in debug mode. Debug enclaves attest all-zero PCRs, so no sound key policy releases a package key
        to them; use it only to read the console while developing.
    type: bool
    default: false
  state:
    description: V(running) starts (or restarts) the enclave as described; V(absent) terminates it.
    type: str
    choices: [running, absent]
    default: running
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reports whether the enclave would be started, restarted or terminated; changes nothing.
  diff_mode:
    support: full
    details: The enclave's image digest and resources before and after.
  platform:
    platforms: posix
requirements:
  - python >= 3.11
  - On V(nitro), C(nitro-cli) on the host.
seealso:
  - module: confidential_ml.nitro.enclave_image
  - module: confidential_ml.nitro.enclave_info
"""

EXAMPLES = r"""
- name: Run the owner's enclave image
  confidential_ml.nitro.enclave_instance:
    name: confidential-ml
    image: /srv/release/enclave.eif
    cpu_count: 2
    memory_mib: 4096
    backend: nitro

- name: Stop it
  confidential_ml.nitro.enclave_instance:
    name: confidential-ml
    state: absent
"""

RETURN = r"""
enclave:
  description: The enclave as C(nitro-cli describe-enclaves) shows it, plus its server's C(Endpoint).
  returned: when state is running and not in check mode, or when it already ran as asked
  type: dict
  sample:
    EnclaveName: confidential-ml
    EnclaveID: i-0123456789abcdef0-enc0123456789abcdef
    EnclaveCID: 16
    NumberOfCPUs: 2
    MemoryMiB: 4096
    State: RUNNING
    Flags: NONE
    Endpoint: vsock://16:5000
action:
  description: What the module did (or would do in check mode).
  returned: always
  type: str
  sample: started
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.module_options import BACKEND_OPTIONS, image_sha256
from ansible_collections.confidential_ml.nitro.plugins.module_utils.runtime import get_runtime, memory_satisfies
from ansible_collections.confidential_ml.nitro.plugins.module_utils.settings import private_dir, state_home


def record_path(name: str):
    return state_home() / "instances" / f"{name}.json"


def wanted(params: dict, digest: str) -> dict:
    return {
        "image_sha256": digest,
        "cpu_count": params["cpu_count"],
        "memory_mib": params["memory_mib"],
        "debug_mode": params["debug_mode"],
        **({"cid": params["cid"]} if params["cid"] is not None else {}),
    }


def started_with(info, record: dict | None) -> dict:
    """What the module recorded when it started this enclave (nothing for another enclave)."""
    return record if info is not None and record and record.get("enclave_id") == info.enclave_id else {}


def current(info, record: dict | None) -> dict:
    if info is None:
        return {}
    recorded = started_with(info, record)
    memory = info.memory_mib
    # nitro-cli reports the memory it allocated, rounded up to hugepages: show what was asked for it.
    if isinstance(recorded.get("memory_mib"), int) and memory_satisfies(recorded["memory_mib"], memory):
        memory = recorded["memory_mib"]
    return {
        "image_sha256": recorded.get("image_sha256"),
        "cpu_count": info.cpu_count,
        "memory_mib": memory,
        "debug_mode": info.debug_mode,
        "cid": info.cid,
    }


def matches(before: dict, after: dict, *, recorded: bool) -> bool:
    """Whether the running enclave (before) is the one asked for (after). Memory the module asked for
    itself compares exactly; otherwise any allocation nitro-cli could have made for the request will do."""
    for key, value in after.items():
        if key == "memory_mib" and not recorded:
            if before.get(key) is None or not memory_satisfies(value, before[key]):
                return False
        elif before.get(key) != value:
            return False
    return True


def main():
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "image": {"type": "path"},
            **BACKEND_OPTIONS,
            "cpu_count": {"type": "int", "default": 2},
            "memory_mib": {"type": "int", "default": 1024},
            "cid": {"type": "int"},
            "debug_mode": {"type": "bool", "default": False},
            "state": {"type": "str", "choices": ["running", "absent"], "default": "running"},
        },
        required_if=[("state", "running", ["image"])],
        supports_check_mode=True,
    )
    params = module.params
    name = params["name"]
    try:
        runtime = get_runtime(params["backend"])
        info = next((e for e in runtime.describe() if e.name == name), None)
        path = record_path(name)
        record = json.loads(path.read_text()) if path.exists() else None
        before = current(info, record)

        if params["state"] == "absent":
            if info is None:
                module.exit_json(changed=False, action="none")
            if not module.check_mode:
                runtime.terminate(info.enclave_id)
                path.unlink(missing_ok=True)
            module.exit_json(changed=True, action="terminated", diff={"before": before, "after": {}})

        if not os.path.isfile(params["image"]):
            module.fail_json(
                msg=f"image {params['image']} does not exist: build it (enclave_image) or fetch the release"
            )
        after = wanted(params, image_sha256(params["image"]))
        same = info is not None and matches(before, after, recorded="memory_mib" in started_with(info, record))
        if same:
            module.exit_json(changed=False, action="none", enclave=info.to_json())
        action = "restarted" if info is not None else "started"
        if module.check_mode:
            module.exit_json(changed=True, action=action, diff={"before": before, "after": after})
        if info is not None:
            runtime.terminate(info.enclave_id)
        started = runtime.run(
            params["image"],
            cpu_count=params["cpu_count"],
            memory_mib=params["memory_mib"],
            cid=params["cid"],
            name=name,
            debug_mode=params["debug_mode"],
        )
        private_dir(path.parent)
        path.write_text(json.dumps({"enclave_id": started.enclave_id, **after}, sort_keys=True))
        module.exit_json(
            changed=True, action=action, enclave=started.to_json(), diff={"before": before, "after": after}
        )
    except EnclaveError as err:
        module.fail_json(msg=str(err))


if __name__ == "__main__":
    main()
