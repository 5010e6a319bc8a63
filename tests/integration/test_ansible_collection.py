"""The collection as a user of existing configuration management installs it (issue 15): built with
`ansible-galaxy collection build`, installed into an empty collections path, its playbooks run by their fully
qualified names from a directory outside this checkout. The tarball declares its Python and system needs as
amazon.aws does (requirements.txt, bindep.txt, meta/execution-environment.yml), names amazon.aws as a
dependency, and leaves out what a user does not need."""

import json
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def requirement_lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_requirements_txt_is_pyprojects_dependency_list():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert requirement_lines((ROOT / "requirements.txt").read_text()) == pyproject
    environment = yaml.safe_load((ROOT / "meta" / "execution-environment.yml").read_text())
    assert environment["dependencies"] == {"python": "requirements.txt", "system": "bindep.txt"}
    assert "fuse3 [platform:dpkg]" in (ROOT / "bindep.txt").read_text()


def test_the_built_collection_installs_and_runs_outside_the_checkout(tmp_path, local_cloud):
    work, env = local_cloud
    # The installed copy first (the ansible-doc check below shows it wins). PYTHONPATH stays: it gives the
    # `enclave` command the roles call this checkout's code, as the Makefile's editable install does.
    env = {**env, "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "collections")}
    built = subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "build", str(ROOT), "--output-path", str(tmp_path / "dist")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (tarball,) = (tmp_path / "dist").glob("confidential_ml-nitro-*.tar.gz")
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
        manifest = json.load(archive.extractfile("MANIFEST.json"))
    for shipped in (
        "requirements.txt",
        "bindep.txt",
        "meta/execution-environment.yml",
        "playbooks/run_job.yml",
        "roles/enclave_host/tasks/release.yml",
        "plugins/modules/enclave_run.py",
        "examples/dataset",
    ):
        assert shipped in names, f"the tarball lacks {shipped}"  # fmt: skip
    # What the tests and linters leave in a checkout as well (.mypy_cache and the like were shipped once).
    unneeded = r"(tests|build|benchmarks|collections|\.venv|\.hypothesis|\.\w+_cache)(/|$)"
    left_out = sorted(n for n in names if re.match(unneeded, n))
    assert left_out == [], f"the tarball carries what a user does not need: {left_out[:10]}"
    assert manifest["collection_info"]["dependencies"] == {"amazon.aws": ">=10.0.0,<11.0.0"}
    assert "example.invalid" not in json.dumps(manifest)

    # amazon.aws comes with the ansible package here (Galaxy cannot be reached), hence --no-deps.
    installed = subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "install", "--no-deps", "--force",
         "-p", str(tmp_path / "collections"), str(tarball)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    collection = tmp_path / "collections" / "ansible_collections" / "confidential_ml" / "nitro"
    # The installed copy is the one ansible finds (the project's venv may hold another in its site-packages).
    doc = subprocess.run([str(BIN / "ansible-doc"), "confidential_ml.nitro.enclave_run"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert str(collection / "plugins" / "modules" / "enclave_run.py") in doc.stdout, doc.stdout[:500] + doc.stderr
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n  children:\n    owner: {hosts: {localhost: }}\n    enclave_hosts: {hosts: {localhost: }}\n"
        f"  vars: {{ansible_connection: local, ansible_python_interpreter: {sys.executable}}}\n"
    )

    def play(name: str, profile: str, *extra: str) -> str:
        done = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(inventory), f"confidential_ml.nitro.{name}", "-v", *extra],
            env={**env, "AWS_PROFILE": profile}, cwd=tmp_path, capture_output=True, text=True, timeout=600,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        return done.stdout

    release = tmp_path / "owner" / "release"
    try:
        play("owner", "owner", "-e", f"owner_pipeline_workdir={tmp_path / 'owner'}")
        output = play("run_job", "enclave-host", "-e", f"release_dir={release}", "-e", f"job_dir={tmp_path / 'job'}",
                      "-e", f"enclave_host_dir={tmp_path / 'host'}")  # fmt: skip
    finally:
        subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), "confidential_ml.nitro.cleanup",
                        "-e", f"enclave_host_dir={tmp_path / 'host'}"],
                       env=env, cwd=tmp_path, capture_output=True, timeout=300, check=False)  # fmt: skip
    # The role came from the installed collection, not from this checkout.
    assert str(collection / "roles" / "enclave_host" / "tasks" / "release.yml") in output, output[-3000:]
    metrics = json.loads((tmp_path / "job" / "output" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.9
    assert (tmp_path / "job" / "receipt.json").is_file()
    assert "Verify the receipt on the controller" in output
