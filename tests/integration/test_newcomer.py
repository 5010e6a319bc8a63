"""A newcomer's first hour (issue 12): what breaks when someone follows the README on their own machine.

Each test runs the installed tools as a newcomer would (the `enclave` console script, ansible-playbook),
in a directory of its own.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import settings

BIN = Path(sys.executable).parent


def enclave(*args, env, check=True):
    done = subprocess.run([str(BIN / "enclave"), *args], env=env, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip
    if check:
        assert done.returncode == 0, f"enclave {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture
def deep_home():
    """(home, env): an ENCLAVE_HOME 120+ characters long, as under a deep checkout; afterwards `local down`."""
    work = Path(tempfile.mkdtemp(prefix="newcomer-", dir="/tmp"))
    home = work / "home-alice-src" / "confidential-ml-nitro" / "build" / "a-rather-long-directory-name" / "home"
    while len(str(home)) < 130:
        home = home.parent / "deeper" / home.name
    env = {**os.environ, "ENCLAVE_HOME": str(home), "AWS_SECRET_ACCESS_KEY": "local-only"}
    env.pop("ENCLAVE_ENDPOINT", None)
    env.pop(settings.ENV_RUNTIME_DIR, None)
    yield home, env
    enclave("local", "down", env=env, check=False)
    shutil.rmtree(work, ignore_errors=True)


def test_local_flow_with_a_deep_enclave_home(deep_home, tmp_path):
    """Item 1: up, build, run-enclave, push, attest and down, with ENCLAVE_HOME at 130+ characters."""
    home, env = deep_home
    assert len(str(home)) >= 120
    enclave("local", "up", env=env)
    image = home / "images" / "enclave.eif"
    pcr0 = json.loads(enclave("local", "build", "--output", str(image), env=env).stdout)["Measurements"]["PCR0"]
    described = json.loads(
        enclave("local", "run-enclave", "--eif-path", str(image), "--cpu-count", "1", "--memory", "128", env=env).stdout
    )
    endpoint = described["Endpoint"]
    # The socket lives in the home's short runtime directory, whatever the home's depth.
    runtime = settings.runtime_dir(home)
    assert endpoint.startswith(f"unix://{runtime}/") and len(endpoint) - len("unix://") <= 107
    assert (runtime.stat().st_mode & 0o777) == 0o700

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "a.csv").write_text("x,y\n1,2\n")
    pushed = json.loads(enclave("push", str(dataset), "/dataset", "--json", "--expect-pcr0", pcr0, env=env).stdout)
    assert "a.csv" in json.dumps(pushed)
    attested = json.loads(enclave("attest", "--json", env=env).stdout)
    assert attested["pcrs"]["0"] == pcr0
    # A FUSE mount of the enclave's share, left mounted: `local down` must not leave it dangling.
    synced = tmp_path / "synced_folder"
    enclave("sync", "-d", str(synced), "--expect-pcr0", pcr0, env=env)
    assert (synced / "dataset" / "a.csv").read_text() == "x,y\n1,2\n"

    stopped = json.loads(enclave("local", "down", "--json", env=env).stdout)
    assert stopped["unmounted"] == [str(synced)] and len(stopped["enclaves"]) == 1 and stopped["kms"]
    assert not os.path.ismount(synced) and os.listdir(synced) == []  # no "Transport endpoint is not connected"
    assert [p.name for p in (home / "mounts").glob("*.json") if not p.name.endswith(".stats.json")] == []
    assert json.loads(enclave("local", "describe-enclaves", env=env).stdout) == []
    assert [p.name for p in (runtime / "enclaves").iterdir()] == [".lock"]
    # Item 4: nothing left to stop is no error, for each stop command.
    again = enclave("local", "down", env=env)
    assert again.stdout == "the local KMS was not running\n", again.stdout
    nothing = {"unmounted": [], "enclaves": [], "kms": None}
    assert json.loads(enclave("local", "down", "--json", env=env).stdout) == nothing
    assert json.loads(enclave("local", "terminate-enclave", "--all", env=env).stdout) == []


MODULES_PLAYBOOK = """\
- name: The user's modules find the one local enclave by themselves, or say why not
  hosts: localhost
  gather_facts: false
  tasks:
    - name: No enclave yet - info reports why, without failing
      confidential_ml.nitro.enclave_info:
        gather: [health]
      register: before
      when: not enclave_running

    - name: No enclave yet - a push fails with the reason
      confidential_ml.nitro.enclave_sync:
        mode: push
        src: "{{ dataset }}"
        dest: /dataset
      register: push_before
      ignore_errors: true
      when: not enclave_running

    - name: No enclave yet - a run fails with the reason
      confidential_ml.nitro.enclave_run:
        package: app.pkg
        script: hello.py
      register: run_before
      ignore_errors: true
      when: not enclave_running

    - name: Without an endpoint, each says there is no running local enclave
      ansible.builtin.assert:
        that:
          - not before.reachable
          - "'no running enclave found on the local backend' in before.endpoint_error"
          - push_before.failed and 'no running enclave found on the local backend' in push_before.msg
          - run_before.failed and 'no running enclave found on the local backend' in run_before.msg
      when: not enclave_running

    - name: Push the package and the dataset to the enclave found
      confidential_ml.nitro.enclave_sync:
        mode: push
        src: "{{ item }}"
        dest: "{{ '/encrypted' if item is search('published') else '/dataset' }}"
        expect_pcr0: "{{ pcr0 }}"
      loop: ["{{ published }}", "{{ dataset }}"]
      register: pushed
      when: enclave_running

    - name: Run in the enclave found
      confidential_ml.nitro.enclave_run:
        package: app.pkg
        script: hello.py
        expect_pcr0: "{{ pcr0 }}"
      register: ran
      when: enclave_running

    - name: Ask the enclave found about itself
      confidential_ml.nitro.enclave_info:
        gather: [health, attestation]
        expect_pcr0: "{{ pcr0 }}"
      register: found
      when: enclave_running

    - name: Ask the enclave named about itself
      confidential_ml.nitro.enclave_info:
        gather: [health]
        endpoint: "{{ endpoint }}"
      register: named
      when: enclave_running

    - name: The modules used the one local enclave
      ansible.builtin.assert:
        that:
          - pushed.results | map(attribute='changed') | list == [true, true]
          - ran.rc == 0 and ran.stdout_lines == ['hello from ' ~ endpoint]
          - found.endpoint == named.endpoint == endpoint
          - found.reachable and named.reachable
          - found.attestation.pcrs['0'] == pcr0
      when: enclave_running
"""


def test_user_modules_discover_the_local_enclave_through_ansible_playbook(local_cloud, ansible_playbook, tmp_path):
    """Item 2: enclave_info, enclave_sync and enclave_run on the local backend with and without `endpoint`,
    as AnsiballZ ships them (module_utils only)."""
    import boto3

    from ansible_collections.confidential_ml.nitro.enclave_local.kms import load_credentials
    from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_seal
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import render_policy

    work, env = local_cloud
    env = {**env, "AWS_PROFILE": "enclave-host"}
    play_env = {name: env[name] for name in ("PATH", "ENCLAVE_HOME", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE")}
    playbook = tmp_path / "modules.yml"
    playbook.write_text(MODULES_PLAYBOOK)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "a.txt").write_text("a\n")
    # The local cloud (and with it the credentials the modules sign with) runs; no enclave does yet.
    cloud = json.loads(enclave("local", "up", "--json", env=env).stdout)
    variables = {"dataset": str(dataset), "published": "", "pcr0": "", "endpoint": ""}
    stats, tasks, output = ansible_playbook(playbook, {**variables, "enclave_running": False}, env=play_env)
    assert stats["failures"] == 0 and "no running enclave found" in output

    image = work / "enclave.eif"
    pcr0 = json.loads(enclave("local", "build", "--output", str(image), env=env).stdout)["Measurements"]["PCR0"]
    endpoint = json.loads(
        enclave("local", "run-enclave", "--eif-path", str(image), "--cpu-count", "1", "--memory", "128", env=env).stdout
    )["Endpoint"]
    issued = load_credentials(cloud["kms_credentials"])["owner"]
    owner = boto3.client("kms", endpoint_url=cloud["kms_endpoint_url"], region_name="us-east-1",
                         aws_access_key_id=issued["aws_access_key_id"],
                         aws_secret_access_key=issued["aws_secret_access_key"])  # fmt: skip
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    policy = render_policy(account_id="111122223333", user_principals=["arn:aws:iam::444455556666:role/enclave-host"],
                           admin_principals=["arn:aws:iam::111122223333:role/owner"], pcr0=[pcr0])  # fmt: skip
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.py").write_text(f"print('hello from {endpoint}')\n")
    published = tmp_path / "published"
    published.mkdir()
    package_seal.seal(app, published / "app.pkg", kms_client=owner, key_id=key_id, name="app", version="1.0")

    variables = {"dataset": str(dataset), "published": str(published), "pcr0": pcr0, "endpoint": endpoint}
    ansible_playbook(playbook, {**variables, "enclave_running": True}, env=play_env)


def bare_aws_env(tmp_path, **variables) -> dict:
    """The environment without any AWS configuration but `variables`: no shared files, no instance metadata."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "no-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-creds"),
               AWS_EC2_METADATA_DISABLED="true", ENCLAVE_HOME=str(tmp_path / "home"), **variables)  # fmt: skip
    return env


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ({"AWS_ACCESS_KEY_ID": "enclave-host", "AWS_DEFAULT_REGION": "us-east-1"},
         "incomplete AWS credentials in the environment: AWS_SECRET_ACCESS_KEY is not set"),
        ({"AWS_ACCESS_KEY_ID": "owner", "AWS_SECRET_ACCESS_KEY": "x"}, "no AWS region configured for KMS"),
    ],
)  # fmt: skip
def test_cli_kms_commands_say_what_to_set(tmp_path, variables, says):
    """Item 4: one line saying what to set, never botocore's traceback."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.py").write_text("print('hello')\n")
    env = bare_aws_env(tmp_path, **variables)
    commands = [("package", "seal", str(app), "-o", str(tmp_path / "app.pkg"), "--key", "alias/app")]
    if "AWS_SECRET_ACCESS_KEY" not in variables:  # `enclave run` reads the host's credentials first
        commands.append(
            ("run", "-f", "app.pkg", "-s", "hello.py", "--endpoint", f"unix://{tmp_path}/none.sock", "--no-attestation")
        )
    for command in commands:
        done = enclave(*command, env=env, check=False)
        assert done.returncode == 1, done
        assert done.stderr.startswith(f"enclave: error: {says}") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr


KMS_MODULE_PLAYBOOK = """\
- name: A KMS module without a region or with half the credentials
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Seal with what the environment gives
      confidential_ml.nitro.enclave_package:
        src: "{{ app }}"
        dest: "{{ app }}.pkg"
        key_id: alias/app
        name: app
        version: "1.0"
      register: sealed
      ignore_errors: true

    - name: The task failed saying what to set
      ansible.builtin.assert:
        that:
          - sealed.failed
          - sealed.msg is search(says)
          - sealed.msg is not search('Traceback|botocore')
          - sealed.msg.splitlines() | length == 1
"""


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ({"AWS_ACCESS_KEY_ID": "owner", "AWS_DEFAULT_REGION": "us-east-1"},
         "incomplete AWS credentials in the environment: AWS_SECRET_ACCESS_KEY is not set"),
        ({"AWS_ACCESS_KEY_ID": "owner", "AWS_SECRET_ACCESS_KEY": "x"}, "no AWS region configured for KMS: set"),
    ],
)  # fmt: skip
def test_kms_modules_say_what_to_set(ansible_playbook, tmp_path, monkeypatch, variables, says):
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.py").write_text("print('hello')\n")
    playbook = tmp_path / "kms.yml"
    playbook.write_text(KMS_MODULE_PLAYBOOK)
    for name in list(os.environ):  # ansible_playbook starts from os.environ
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    env = {name: value for name, value in bare_aws_env(tmp_path, **variables).items() if name.startswith("AWS_")}
    stats, tasks, output = ansible_playbook(playbook, {"app": str(app), "says": says}, env=env)
    assert stats["ignored"] == 1 and says in tasks["Seal with what the environment gives"]["msg"] and says in output


ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_enclave_command_sees_edits_to_the_checkout(tmp_path):
    """Item 3: the venv's install is editable, so `enclave local build` measures the code as it is now.

    A copy of this checkout is installed editable as the Makefile installs it (uv pip install -e; here pip
    install -e without dependencies, which come from this venv) into a fresh venv; an edit to enclave_server/
    changes what it builds."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()  # fmt: skip
    checkout = tmp_path / "checkout"
    for name in files:
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    venv = tmp_path / "venv"
    planned = subprocess.run(["make", "-n", "-B", "-C", str(checkout), f"VENV={venv}", f"{venv}/bin/enclave"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    (install,) = [line for line in planned.splitlines() if "pip install" in line and ".[test,examples]" in line]
    assert " -e " in install, install

    subprocess.run(["make", "-C", str(checkout), "link"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site, ours = (subprocess.run([python, "-c", purelib], capture_output=True, text=True, check=True).stdout.strip()
                  for python in (str(venv / "bin" / "python"), sys.executable))  # fmt: skip
    Path(site, "zz-dependencies.pth").write_text(ours + "\n")  # after the editable install's own .pth
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "ANSIBLE_COLLECTIONS_PATH")}
    env["ENCLAVE_HOME"] = str(tmp_path / "home")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "-e", str(checkout)], env=env,
                   check=True, capture_output=True, timeout=300)  # fmt: skip

    def build(name):
        command = [str(venv / "bin" / "enclave"), "local", "build", "--output", str(tmp_path / name)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return json.loads(done.stdout)["Measurements"]["PCR0"]

    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import ansible_collections.confidential_ml.nitro.cli.main as m; print(m.__file__)"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert where == str(checkout / "collections/ansible_collections/confidential_ml/nitro/cli/main.py")
    before = build("before.eif")
    server = checkout / "enclave_server" / "server.py"
    server.write_text(server.read_text() + "\n# an edit after installing\n")
    after = build("after.eif")
    assert after != before
    server.write_text(server.read_text().removesuffix("\n# an edit after installing\n"))
    assert build("again.eif") == before


PATHS_PLAYBOOK = """\
- name: The project's playbooks' paths, rendered where they live
  hosts: localhost
  gather_facts: false
  vars: {variables}
  tasks:
    - name: Render them
      ansible.builtin.set_fact:
        rendered: {rendered}
"""


def test_playbook_paths_are_plain(ansible_playbook, tmp_path):
    """Item 5: the paths the playbooks print are plain (no `playbooks/../build`), and they are the checkout's.

    The path variables of playbooks/*.yml and of the owner_pipeline role's defaults, rendered by a playbook
    in the playbooks/ directory of a checkout-shaped directory."""
    import yaml

    variables = {}
    for name in ("owner.yml", "run_job.yml"):
        for play in yaml.safe_load((ROOT / "playbooks" / name).read_text()):
            variables.update({k: v for k, v in play["vars"].items() if k.endswith(("_dir", "_workdir"))})
    role = yaml.safe_load((ROOT / "roles" / "owner_pipeline" / "defaults" / "main.yml").read_text())
    variables["role_workdir"] = role["owner_pipeline_workdir"]
    assert {"owner_pipeline_workdir", "release_dir", "dataset_dir", "job_dir", "outputs_dir"} <= set(variables)
    checkout = tmp_path / "checkout"
    (checkout / "playbooks").mkdir(parents=True)
    playbook = checkout / "playbooks" / "paths.yml"
    rendered = {name: "{{ %s }}" % name for name in variables}  # noqa: UP031 (Jinja braces)
    playbook.write_text(PATHS_PLAYBOOK.format(variables=json.dumps(variables), rendered=json.dumps(rendered)))
    stats, tasks, output = ansible_playbook(playbook, {})
    assert stats["ok"] == 1 and "Render them" in output
    paths = tasks["Render them"]["ansible_facts"]["rendered"]
    assert paths == {
        "owner_pipeline_workdir": f"{checkout}/build/owner",
        "release_dir": f"{checkout}/build/owner/release",
        "dataset_dir": f"{checkout}/examples/dataset",
        "job_dir": f"{checkout}/build/jobs/localhost",
        "outputs_dir": f"{checkout}/build/jobs/localhost/output",
        "role_workdir": f"{checkout}/build/owner",
    }


def test_the_readme_sessions_leave_nothing_for_git(tmp_path):
    """Item 5: what following the README leaves in the checkout is ignored (found by running its sample session
    and the owner's walkthrough by hand in a copy): the FUSE mount point with the enclave's files while mounted,
    the receipt, policy.json and app.pkg; and .venv when it is a symlink to a shared venv."""
    leftovers = ["synced_folder/encrypted/digits-classifier.pkg", "synced_folder/dataset/batch_1.csv",
                 "synced_folder/output/metrics.json", "receipt.json", "policy.json", "app.pkg", ".venv",
                 "build/home/cloud.json", "collections/ansible_collections/confidential_ml/nitro"]  # fmt: skip
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy2(ROOT / ".gitignore", checkout / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
    for name in leftovers:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("left behind\n")
    (checkout / ".venv").unlink()
    (checkout / ".venv").symlink_to(tmp_path)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=checkout,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert status.splitlines() == ["?? .gitignore"]


def test_a_socket_directory_still_too_long_is_named_with_what_to_set(tmp_path, monkeypatch):
    """Item 1: when the runtime directory is too long after all (a long $ENCLAVE_RUNTIME_DIR), the local backend's
    commands, as modules and discovery run them, say so naming `enclave local` and the variables, not nitro-cli."""
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveRuntimeError
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.runtime import LocalCliRuntime, resolve_endpoint

    monkeypatch.setenv(settings.ENV_RUNTIME_DIR, str(tmp_path / ("r" * 80)))
    monkeypatch.delenv("ENCLAVE_ENDPOINT", raising=False)
    for call in (LocalCliRuntime(home=tmp_path / "home").describe, resolve_endpoint):
        with pytest.raises(EnclaveRuntimeError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith(
            "`enclave local describe-enclaves` failed (exit 1): enclave: error: the local runtime"
        )
        assert "set ENCLAVE_RUNTIME_DIR to a directory of at most" in message and "ENCLAVE_HOME" in message
        assert "nitro-cli" not in message


def test_local_env_and_seal_use_the_running_local_cloud(tmp_path):
    """Item 2: `eval "$(enclave local env)"` points boto3, the AWS CLI and `enclave` at the local cloud; and
    `enclave package seal` finds the local KMS by itself, with no region and no endpoint, even with a region of
    real AWS in the environment (no network here: had it called AWS, it would fail)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.py").write_text("print('hello')\n")
    env = bare_aws_env(tmp_path, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    not_running = enclave("local", "env", env=env, check=False)
    assert not_running.returncode == 1 and not_running.stdout == ""
    assert not_running.stderr == (f"enclave: error: the local cloud of {tmp_path / 'home'} is not running: start it "
                                  "with `enclave local up` (same ENCLAVE_HOME), then run this again\n")  # fmt: skip
    cloud = json.loads(enclave("local", "up", "--json", env=env).stdout)
    try:
        # In a shell as the README does it: boto3 and the AWS CLI (if installed) reach the local KMS as the owner.
        script = """
            eval "$(enclave local env --profile owner)"
            python -c 'import boto3; k = boto3.client("kms"); print(k.create_key()["KeyMetadata"]["Arn"])'
            if command -v aws >/dev/null; then aws kms list-keys --query 'length(Keys)'; else echo 1; fi
            echo "$ENCLAVE_HOME $AWS_PROFILE ${AWS_ACCESS_KEY_ID-unset}"
        """
        done = subprocess.run(["bash", "-euc", script], env={**env, "AWS_ACCESS_KEY_ID": "a-stray-key"},
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        key_arn, count, shell = done.stdout.splitlines()
        assert key_arn.startswith("arn:aws:kms:us-east-1:") and count == "1"
        assert shell == f"{tmp_path / 'home'} owner unset"

        # Seal with only a profile chosen: the local KMS, although AWS_DEFAULT_REGION names another region.
        profiled = dict(env, AWS_SHARED_CREDENTIALS_FILE=cloud["kms_credentials"], AWS_PROFILE="owner",
                        AWS_DEFAULT_REGION="eu-west-3")  # fmt: skip
        sealed = json.loads(enclave("package", "seal", str(app), "-o", str(tmp_path / "app.pkg"), "--key", key_arn,
                                    "--json", env=profiled).stdout)  # fmt: skip
        assert sealed["key_id"] == key_arn
        # Without the local KMS's credentials: one line that says how to get them.
        done = enclave("package", "seal", str(app), "-o", str(tmp_path / "b.pkg"), "--key", key_arn, env=env,
                       check=False)  # fmt: skip
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"enclave: error: the local KMS at {cloud['kms_endpoint_url']} needs the "
                                      'credentials it issued: eval "$(enclave local env --profile owner)"')  # fmt: skip
        # An explicit endpoint still wins: nothing listens there, so it fails saying where it tried.
        done = enclave("package", "seal", str(app), "-o", str(tmp_path / "c.pkg"), "--key", key_arn,
                       "--kms-endpoint", "http://127.0.0.1:9", env=profiled, check=False)  # fmt: skip
        assert done.returncode != 0 and "127.0.0.1:9" in done.stderr
    finally:
        enclave("local", "down", env=env, check=False)
    # With the cloud down, no region and no endpoint: one line, naming the local cloud as the other way.
    done = enclave("package", "seal", str(app), "-o", str(tmp_path / "d.pkg"), "--key", "alias/app",
                   env=dict(env, AWS_ACCESS_KEY_ID="owner", AWS_SECRET_ACCESS_KEY="x"), check=False)  # fmt: skip
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("enclave: error: no AWS region configured for KMS")
    assert done.stderr.rstrip().endswith("or start the local cloud (`enclave local up`), which is then used")


def test_the_demo_accounts_follow_the_threat_model(tmp_path):
    """The demo's accounts: the local cloud issues the owner and the user's host in different accounts, the demo's role
    defaults name them so, and the rendered policy has no account-root statement: lint calls it sound. The
    unsafe variant (the host in the owner's account, AWS's root statement kept) is refused by lint, and the
    host breaks it on the local KMS as it would on AWS: it rewrites the policy and decrypts without an
    attestation. In the demo's layout the same attempts are refused."""
    import boto3
    import yaml
    from botocore.exceptions import ClientError

    from ansible_collections.confidential_ml.nitro.enclave_local.kms import load_credentials
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import SID_AWS_DEFAULT

    env = bare_aws_env(tmp_path, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    cloud = json.loads(enclave("local", "up", "--json", env=env).stdout)
    try:
        issued = load_credentials(cloud["kms_credentials"])

        def client(profile):
            return boto3.client("kms", endpoint_url=cloud["kms_endpoint_url"], region_name="us-east-1",
                                aws_access_key_id=issued[profile]["aws_access_key_id"],
                                aws_secret_access_key=issued[profile]["aws_secret_access_key"])  # fmt: skip

        owner_arn, host_arn = issued["owner"]["principal_arn"], issued["enclave-host"]["principal_arn"]
        assert owner_arn == "arn:aws:iam::111122223333:role/owner"
        assert host_arn == "arn:aws:iam::444455556666:role/enclave-host"
        defaults = yaml.safe_load((ROOT / "roles" / "owner_pipeline" / "defaults" / "main.yml").read_text())
        assert defaults["owner_pipeline_user_principals"] == [host_arn]
        admins = [a.replace("{{ owner_pipeline_account_id }}", defaults["owner_pipeline_account_id"])
                  for a in defaults["owner_pipeline_admin_principals"]]  # fmt: skip
        assert admins == [owner_arn]

        pcr0 = "ab" * 48
        rendered = enclave("policy", "render", "--account-id", "111122223333", "--pcr0", pcr0, "--user-principal",
                           host_arn, "--admin-principal", owner_arn, env=env).stdout  # fmt: skip
        safe = json.loads(rendered)
        assert [s["Sid"] for s in safe["Statement"] if ":root" in json.dumps(s.get("Principal"))] == []
        (tmp_path / "safe.json").write_text(rendered)
        lint = enclave("policy", "lint", str(tmp_path / "safe.json"), "--user-principal", host_arn, env=env)
        assert lint.stdout == f"{tmp_path / 'safe.json'}: sound\n"

        # The unsafe variant: the host's role in the owner's account (here the local cloud's "admin" profile, a
        # role of 111122223333 that administers nothing) and AWS's default root statement kept.
        same_account = issued["admin"]["principal_arn"]
        root = {"Sid": SID_AWS_DEFAULT, "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
                "Action": "kms:*", "Resource": "*"}  # fmt: skip
        unsafe = json.loads(enclave("policy", "render", "--account-id", "111122223333", "--pcr0", pcr0,
                                    "--user-principal", same_account, "--admin-principal", owner_arn,
                                    env=env).stdout)  # fmt: skip
        unsafe["Statement"].insert(0, root)
        (tmp_path / "unsafe.json").write_text(json.dumps(unsafe))
        lint = enclave("policy", "lint", str(tmp_path / "unsafe.json"), "--user-principal", same_account, "--json",
                       env=env, check=False)  # fmt: skip
        assert lint.returncode == 1
        problems = json.loads(lint.stdout)["problems"]
        assert any("to the whole account arn:aws:iam::111122223333:root without conditions" in p for p in problems)
        assert any(f"the user {same_account} is in that account" in p and "drop the Deny" in p for p in problems)

        owner = client("owner")
        blobs = {}
        for name, policy in (("unsafe", unsafe), ("safe", safe)):
            key = owner.create_key(Policy=json.dumps(policy))["KeyMetadata"]
            assert key["AWSAccountId"] == "111122223333"
            owner.create_alias(AliasName=f"alias/{name}", TargetKeyId=key["KeyId"])
            blobs[name] = (key["Arn"], owner.generate_data_key(KeyId=key["Arn"], KeySpec="AES_256")["CiphertextBlob"])

        # The host in the owner's account, as the root statement lets it: rewrite the policy, then decrypt.
        arn, blob = blobs["unsafe"]
        insider = client("admin")
        with pytest.raises(ClientError, match="AccessDenied"):
            insider.decrypt(CiphertextBlob=blob)
        insider.put_key_policy(KeyId=arn, PolicyName="default", Policy=json.dumps({"Version": "2012-10-17",
                               "Statement": [root]}))  # fmt: skip
        assert len(insider.decrypt(CiphertextBlob=blob)["Plaintext"]) == 32

        # The demo's host, in its own account: the same attempts are refused (a cross-account caller can never
        # change a key policy, whatever it says), and the owner's alias is not even its name for the key.
        arn, blob = blobs["safe"]
        host = client("enclave-host")
        with pytest.raises(ClientError, match="not a cross-account operation"):
            host.put_key_policy(KeyId=arn, PolicyName="default", Policy=json.dumps({"Version": "2012-10-17",
                                "Statement": [root | {"Principal": {"AWS": host_arn}}]}))  # fmt: skip
        with pytest.raises(ClientError, match="AccessDenied.*explicit deny"):
            host.decrypt(CiphertextBlob=blob)
        with pytest.raises(ClientError, match="NotFoundException.*444455556666:alias/safe"):
            host.describe_key(KeyId="alias/safe")
        assert host.list_keys()["Keys"] == []  # keys are per account
        assert host.create_key()["KeyMetadata"]["Arn"].startswith("arn:aws:kms:us-east-1:444455556666:key/")
    finally:
        enclave("local", "down", env=env, check=False)


def test_the_local_kms_keeps_its_port_and_upgrades_old_credentials(tmp_path):
    """`enclave local env`'s exports stay true across `local down` and `local up` (the KMS takes its port again),
    and a home whose credentials were issued before the parties had accounts of their own gets them, keys kept."""
    import configparser

    from ansible_collections.confidential_ml.nitro.enclave_local import cloud
    from ansible_collections.confidential_ml.nitro.enclave_local.kms import issue_credentials, load_credentials

    env = bare_aws_env(tmp_path, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    old = issue_credentials(tmp_path / "home" / "kms")  # as issued before: no principal_arn
    before = load_credentials(old)
    assert all("principal_arn" not in entry for entry in before.values())
    try:
        first = json.loads(enclave("local", "up", "--json", env=env).stdout)
        exported = enclave("local", "env", env=env).stdout
        assert f"export AWS_ENDPOINT_URL_KMS={first['kms_endpoint_url']}\n" in exported
        enclave("local", "down", env=env)
        again = json.loads(enclave("local", "up", "--json", env=env).stdout)
        assert again["started"] and again["kms_endpoint_url"] == first["kms_endpoint_url"]
        assert enclave("local", "env", env=env).stdout == exported
    finally:
        enclave("local", "down", env=env, check=False)
    after = load_credentials(old)
    assert {name: entry.pop("principal_arn") for name, entry in after.items()} == cloud.PRINCIPALS
    assert after == before
    configparser.ConfigParser(interpolation=None).read_string(old.read_text())  # still a shared-credentials file
    assert oct(old.stat().st_mode & 0o777) == "0o600"
