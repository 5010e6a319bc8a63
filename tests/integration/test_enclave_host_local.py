"""The enclave_host role's preparation of a host for the local backend (roles/enclave_host/tasks/local.yml): FUSE 3
is installed with apt only when dpkg says a package of it is missing (the apt module costs about 2 s of CPU per
host even when nothing is), and the local cloud is started."""

import os
from pathlib import Path

import pytest

PLAYBOOK = """\
- name: Prepare this machine as a local enclave host
  hosts: localhost
  gather_facts: false
  tasks:
    - name: The role's tasks for the local backend
      ansible.builtin.include_role:
        name: confidential_ml.nitro.enclave_host
        tasks_from: local.yml
"""

# dpkg-query as Debian's answers for a host where libfuse3-3 was removed and fuse3 left (status "un": unknown, not
# installed); exit status 0, as dpkg-query's is for a package it knows.
DPKG_QUERY_LIBFUSE_REMOVED = """\
#!/bin/sh
printf '%s\\n' "$@" >> "$(dirname "$0")/calls"
printf 'ii \\nun \\n'
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud's namespaces need root")


def play(ansible_playbook, tmp_path: Path, cloud_env: dict, *args: str, path: str = ""):
    """The play in the local cloud of cloud_env (its ENCLAVE_HOME), with path first on PATH."""
    playbook = tmp_path / "local_host.yml"
    playbook.write_text(PLAYBOOK)
    env = {name: cloud_env[name] for name in ("ENCLAVE_HOME", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "PATH")}
    if path:
        env["PATH"] = f"{path}:{env['PATH']}"
    return ansible_playbook(playbook, {}, *args, env=env)


@needs_root
def test_fuse_installed_skips_apt(ansible_playbook, local_cloud, tmp_path):
    """This machine has FUSE 3 (make deps): dpkg-query says so and the apt task does not run."""
    _work, env = local_cloud
    _stats, tasks, _output = play(ansible_playbook, tmp_path, env)
    looked = tasks["Look for FUSE 3 (for enclave sync) among the installed Debian packages"]
    assert looked["rc"] == 0 and looked["stdout_lines"] == ["ii ", "ii "], looked
    installed = tasks["Install FUSE 3 (for enclave sync)"]
    assert installed.get("skip_reason") == "Conditional result was False", installed


@needs_root
def test_a_missing_fuse_package_runs_apt(ansible_playbook, local_cloud, tmp_path):
    """Where dpkg-query reports libfuse3-3 not installed, the apt task runs (in check mode here: apt itself, reading
    the real package database, then finds nothing to install on this machine)."""
    _work, env = local_cloud
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dpkg-query").write_text(DPKG_QUERY_LIBFUSE_REMOVED)
    (fake / "dpkg-query").chmod(0o755)
    _stats, tasks, _output = play(ansible_playbook, tmp_path, env, "--check", path=str(fake))
    assert (fake / "calls").read_text().split() == [
        "--show",
        "--showformat=${db:Status-Abbrev}\\n",
        "fuse3",
        "libfuse3-3",
    ]
    installed = tasks["Install FUSE 3 (for enclave sync)"]
    assert "skip_reason" not in installed and not installed.get("failed") and "changed" in installed, installed
