#!/usr/bin/python
# Copyright: confidential_ml.nitro developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION, EXAMPLES and RETURN before the imports)

from __future__ import annotations

DOCUMENTATION = r"""
module: enclave_sync
short_description: Copy files between the host and the enclave's share, or mount the share on a host folder
version_added: 0.1.0
description:
  - The enclave's share is the in-memory file system the enclave server exposes to the host, with the top-level
    folders C(/encrypted) (packages), C(/dataset) and C(/model) (the user's inputs) and C(/output) (what jobs write).
  - With O(mode=push), copies the directory O(src) on the managed node into the share directory O(dest); with
    O(mode=pull), copies the share directory O(src) into the directory O(dest) on the managed node (created when
    missing).
  - Files are compared by size, then by SHA-256 (computed on each side) where the sizes match, and only those that
    differ or are missing are copied, so the task changes something only when a file moved. A file is written under
    a temporary name and renamed once whole, so a failed copy leaves no partial file. Nothing is ever deleted on
    the receiving side. Symbolic links and special files are skipped on the host and never followed or written
    through.
  - With O(state=mounted), keeps the share mounted with FUSE on the host folder O(path) (the C(enclave sync -d)
    workflow, where C(cp) puts packages and data in and C(/output) is read back), served by a background process
    that outlives the task; with O(state=unmounted), unmounts it.
author:
  - confidential_ml.nitro developers (@confidential-ml)
options:
  mode:
    description:
      - V(push) copies from the managed node into the enclave, V(pull) from the enclave to the managed node.
      - Exactly one of O(mode) and O(state) is required.
    type: str
    choices: [push, pull]
  src:
    description:
      - With O(mode=push), a directory on the managed node whose contents are copied (links and special files are
        skipped).
      - With O(mode=pull), a directory of the share, such as V(/output).
      - On the managed node, C(~) and environment variables are expanded (as for every C(path) option); in the
        share they mean nothing, so do not use them there.
    type: path
  dest:
    description:
      - With O(mode=push), a directory of the share, such as V(/dataset) or V(/encrypted); missing directories
        below the top level are created.
      - With O(mode=pull), a directory on the managed node; created when missing.
    type: path
  state:
    description:
      - V(mounted) mounts the share on O(path) unless it is already mounted there from the same enclave.
      - V(unmounted) unmounts the share from O(path) if something is mounted there.
    type: str
    choices: [mounted, unmounted]
  path:
    description:
      - The host folder to mount the share on or unmount it from, with O(state).
      - To mount, it must be an empty directory, or missing (it is then created, with its parents).
    type: path
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - confidential_ml.nitro.enclave
attributes:
  check_mode:
    support: full
    details:
      - With O(mode), compares both sides (a dry run) and returns the files that would be copied; copies nothing.
      - With O(state), reports whether the share would be mounted or unmounted; mounts nothing.
  diff_mode:
    support: full
    details:
      - With O(mode), the files copied (or that would be), with the direction and byte count.
      - With O(state), whether O(path) is mounted before and after.
  platform:
    platforms: posix
requirements:
  - python >= 3.11
  - mfusepy >= 3.0 and libfuse 3 (C(fuse3), C(libfuse3-3)), for O(state=mounted)
notes:
  - O(state=mounted) needs C(/dev/fuse) and C(fusermount3) (root, or a user allowed to use FUSE). The mount serves
    until it is unmounted (O(state=unmounted), C(enclave sync -d PATH --unmount) or C(fusermount3 -u PATH)); its
    process's log is in the state directory (E(ENCLAVE_HOME)).
  - For O(state=mounted), O(expect_pcr0) takes a single value.
seealso:
  - module: confidential_ml.nitro.enclave_run
  - module: confidential_ml.nitro.enclave_info
"""

EXAMPLES = r"""
- name: Put the owner's package into the enclave
  confidential_ml.nitro.enclave_sync:
    mode: push
    src: /srv/published/encrypted
    dest: /encrypted
    expect_pcr0: "{{ owner_pcr0 }}"

- name: Put the user's dataset into the enclave
  confidential_ml.nitro.enclave_sync:
    mode: push
    src: /srv/dataset
    dest: /dataset
    expect_pcr0: "{{ owner_pcr0 }}"

- name: Fetch the results
  confidential_ml.nitro.enclave_sync:
    mode: pull
    src: /output
    dest: /srv/results
  register: results

- name: Mount the share on a host folder, like `enclave sync -d synced_folder`
  confidential_ml.nitro.enclave_sync:
    state: mounted
    path: /srv/synced_folder
    expect_pcr0: "{{ owner_pcr0 }}"

- name: Unmount it
  confidential_ml.nitro.enclave_sync:
    state: unmounted
    path: /srv/synced_folder
"""

RETURN = r"""
changed_files:
  description:
    - Paths (relative to O(src)) of the files and directories copied, or in check mode those that would be.
  returned: with O(mode)
  type: list
  elements: str
  sample: [a.csv, images, images/1.png]
unchanged:
  description: How many files and directories were already the same on both sides.
  returned: with O(mode)
  type: int
  sample: 12
bytes:
  description: Bytes copied (or that would be, in check mode).
  returned: with O(mode)
  type: int
  sample: 1048576
src:
  description: O(src) as used.
  returned: with O(mode)
  type: str
  sample: /srv/dataset
dest:
  description: O(dest) as used.
  returned: with O(mode)
  type: str
  sample: /dataset
path:
  description: The mount point, as an absolute path.
  returned: with O(state)
  type: str
  sample: /srv/synced_folder
mounted:
  description: Whether the share is mounted on RV(path) after the task (in check mode, whether it would be).
  returned: with O(state)
  type: bool
  sample: true
endpoint:
  description: The enclave server the share is (or would be) mounted from.
  returned: with O(state=mounted)
  type: str
  sample: vsock://16:5000
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.confidential_ml.nitro.plugins.module_utils import mounts
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import IMPORT_ERROR as CLIENT_IMPORT_ERROR
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.module_options import (
    ENCLAVE_MUTUALLY_EXCLUSIVE,
    ENCLAVE_OPTIONS,
    ENCLAVE_REQUIRED_BY,
    connect,
    enclave_endpoint,
    enclave_pcr0,
    require_libraries,
)


def transfer(module):
    params = module.params
    mode, src, dest = params["mode"], params["src"], params["dest"]
    if mode == "push":
        src = os.path.abspath(src)
        if not os.path.isdir(src):
            module.fail_json(
                msg=f"src {src} is not a directory on the managed node: push copies a directory's contents"
            )
        where = (src, f"enclave:{dest}")
    else:
        dest = os.path.abspath(dest)
        if os.path.lexists(dest) and not os.path.isdir(dest):
            module.fail_json(msg=f"dest {dest} exists and is not a directory: pull copies into a directory")
        where = (f"enclave:{src}", dest)

    client = connect(module)
    try:
        move = client.push if mode == "push" else client.pull
        moved = move(src, dest, dry_run=module.check_mode)
    except (EnclaveError, OSError) as err:
        module.fail_json(msg=f"{mode} from {where[0]} to {where[1]} failed: {err}")
    finally:
        client.close()

    result = {
        "changed": bool(moved["changed"]),
        "changed_files": moved["changed"],
        "unchanged": moved["unchanged"],
        "bytes": moved["bytes"],
        "src": src,
        "dest": dest,
    }
    if module._diff:
        verb = f"would {mode}" if module.check_mode else mode
        lines = [f"{verb} {where[0]} -> {where[1]}: {len(moved['changed'])} changed, {moved['unchanged']} unchanged,"
                 f" {moved['bytes']} bytes"]  # fmt: skip
        lines += [f"  {path}" for path in moved["changed"]]
        result["diff"] = {"prepared": "\n".join(lines) + "\n"}
    module.exit_json(**result)


def mount_point(module):
    params = module.params
    path = os.path.realpath(params["path"])
    mounted = mounts.is_mounted(path)
    result = {"changed": False, "path": path, "mounted": mounted}

    if params["state"] == "mounted":
        try:
            endpoint = enclave_endpoint(module)
        except EnclaveError as err:
            module.fail_json(msg=str(err))
        result["endpoint"] = endpoint
        pcr0 = enclave_pcr0(module) or []
        if len(pcr0) > 1:
            module.fail_json(
                msg=f"a mount checks one expected PCR0, {len(pcr0)} were given: give the one the enclave should run"
            )
        if mounted:
            state = mounts.mount_state(path)
            if state is None:
                module.fail_json(
                    msg=f"{path} is already a mount point, but not of an enclave share mounted from this host: "
                    "unmount it or choose another path",
                    **result,
                )
            if state.get("endpoint") != endpoint:
                module.fail_json(
                    msg=f"{path} already mounts the share of {state.get('endpoint')}, not {endpoint}: unmount it "
                    "first (state=unmounted)",
                    **result,
                )
        else:
            result.update(changed=True, mounted=True)
            if not module.check_mode:
                try:
                    os.makedirs(path, exist_ok=True)
                    mounts.mount_with_cli(
                        endpoint, path, expect_pcr0=pcr0[0] if pcr0 else None, allow_debug=params["allow_debug"]
                    )
                except (EnclaveError, OSError) as err:
                    module.fail_json(msg=str(err), changed=False, path=path, mounted=False, endpoint=endpoint)
    elif mounted:
        result.update(changed=True, mounted=False)
        if not module.check_mode:
            try:
                mounts.unmount(path)
            except (EnclaveError, OSError) as err:
                module.fail_json(msg=str(err), changed=False, path=path, mounted=mounts.is_mounted(path))

    if module._diff:
        result["diff"] = {
            "before_header": path,
            "after_header": path,
            "before": f"mounted: {str(mounted).lower()}\n",
            "after": f"mounted: {str(result['mounted']).lower()}\n",
        }
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec={
            "mode": {"type": "str", "choices": ["push", "pull"]},
            "src": {"type": "path"},
            "dest": {"type": "path"},
            "state": {"type": "str", "choices": ["mounted", "unmounted"]},
            "path": {"type": "path"},
            **ENCLAVE_OPTIONS,
        },
        required_one_of=[("mode", "state")],
        mutually_exclusive=[("mode", "state"), ("mode", "path"), ("state", "src"), ("state", "dest")]
        + ENCLAVE_MUTUALLY_EXCLUSIVE,
        required_if=[
            ("mode", "push", ("src", "dest")),
            ("mode", "pull", ("src", "dest")),
            ("state", "mounted", ("path",)),
            ("state", "unmounted", ("path",)),
        ],
        required_by=ENCLAVE_REQUIRED_BY,
        supports_check_mode=True,
    )
    require_libraries(module, CLIENT_IMPORT_ERROR)
    if module.params["mode"]:
        transfer(module)
    mount_point(module)


if __name__ == "__main__":
    main()
