"""The local runtime for real: measured images, enclaves in their own namespaces, the local cloud.

Every test gets its own ENCLAVE_HOME (its sockets live in settings.runtime_dir(home)) and ends with
`enclave local down` for that home, then checks that no process mentioning it is left.
Enclaves are real: supervisor, unshare'd init and enclave server, tmpfs share and plaintext,
KMS through the in-enclave forwarder and the host's vsock-proxy.
"""

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import boto3
import pytest

from ansible_collections.confidential_ml.nitro.enclave_local import cloud
from ansible_collections.confidential_ml.nitro.enclave_local.kms import load_credentials
from ansible_collections.confidential_ml.nitro.enclave_local.runtime import (
    MAX_ENCLAVES,
    LocalRuntime,
    Proc,
    discover_local_endpoint,
    local_command,
)
from ansible_collections.confidential_ml.nitro.enclave_local.tls import LocalTlsCA
from ansible_collections.confidential_ml.nitro.enclave_local.vsock_proxy import VsockProxy, parse_allowlist
from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_seal, settings
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient
from ansible_collections.confidential_ml.nitro.plugins.module_utils.enclave_code import IMAGE_PYTHON
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import (
    ConnectionClosedError,
    EnclaveError,
    EnclaveRuntimeError,
    RemoteError,
    VsockProxyError,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import render_policy
from ansible_collections.confidential_ml.nitro.plugins.module_utils.runtime import resolve_endpoint
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import processes_mentioning
from ansible_collections.confidential_ml.nitro.tests.fixtures.sources import copy_enclave_sources

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the local runtime's namespaces and mounts need root")

ROOT = Path(__file__).resolve().parents[2]
ENCLAVE_CLI = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]
ACCOUNT = "111122223333"


def issued(principal: str, path=None) -> dict:
    """boto3 credentials the local KMS issued to principal (by default in this test's ENCLAVE_HOME)."""
    entry = load_credentials(path or settings.state_home() / "kms" / "credentials")[principal]
    return {"aws_access_key_id": entry["aws_access_key_id"], "aws_secret_access_key": entry["aws_secret_access_key"]}


def user_kms() -> dict:
    """The kms argument of job.run: the enclave host's region and credentials."""
    return {"region": "us-east-1", **issued("enclave-host")}


ZERO_PCR = "0" * 96

APP = {
    "hello.py": "print('hello from the enclave', flush=True)\n",
    "spin.py": "import time\nprint('spinning', flush=True)\nwhile True:\n    time.sleep(0.05)\n",
    # Tries to leave the enclave, and reports what it sees of processes and of its own plaintext.
    "probe.py": """
        import json, os, socket, stat, sys

        def tcp(host, port):
            try:
                socket.create_connection((host, port), timeout=5).close()
                return "connected"
            except OSError as err:
                return type(err).__name__

        def cmdline(pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\\0", b" ").decode()

        def mknod():
            try:
                os.mknod("/tmp/disk", stat.S_IFBLK | 0o600, os.makedev(8, 0))
                return "created"
            except OSError as err:
                return type(err).__name__

        def attempt(action):
            try:
                return action() or "done"
            except OSError as err:
                return type(err).__name__

        def forwarder():  # the enclave's KMS forwarder: an answer means it relayed this connection to KMS
            with socket.create_connection(("127.0.0.1", 443), timeout=10) as conn:
                conn.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                return "answered" if conn.recv(16) else "closed"

        def server_memory():
            server = next(
                pid for pid, cmd in processes().items() if "enclave_server" in cmd and "job bootstrap" not in cmd
            )
            with open(f"/proc/{server}/mem", "rb") as f:
                f.read(1)

        def processes():
            return {pid: cmdline(pid) for pid in os.listdir("/proc") if pid.isdigit()}
        def capabilities():
            with open("/proc/self/status") as f:
                return {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k.startswith("Cap")}

        cwd = os.getcwd()
        st = os.stat(cwd)
        report = {
            "uid": os.getuid(),
            "nsm": attempt(lambda: open("/dev/nsm", "rb").close()),
            "nsm_socket": attempt(lambda: socket.socket(socket.AF_UNIX).connect("/dev/nsm")),
            "forwarder": attempt(forwarder),
            "server_memory": attempt(server_memory),
            "tmp": attempt(lambda: open("/tmp/left-behind", "w").close()),
            "mknod": mknod(),
            "capabilities": capabilities(),
            "tcp": {target: tcp(target.rsplit(":", 1)[0], int(target.rsplit(":", 1)[1])) for target in sys.argv[1:]},
            "processes": {pid: cmdline(pid) for pid in os.listdir("/proc") if pid.isdigit()},
            "plaintext": cwd,
            "plaintext_device": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
        }
        print(json.dumps(report), flush=True)
    """,
}


def holders_of_namespace(ns: str) -> list[int]:
    holders = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with_ns = entry / "ns" / "mnt"
            try:
                if os.readlink(with_ns) == ns:
                    holders.append(int(entry.name))
            except OSError:
                continue
    return holders


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The project's image, built twice, and one built from a copy with one byte changed in enclave_server."""
    out = tmp_path_factory.mktemp("images")
    runtime = LocalRuntime(out / "home")
    good = runtime.build(output=str(out / "good.eif"))
    again = runtime.build(output=str(out / "again.eif"))
    src = out / "src"
    copy_enclave_sources(src)
    server = src / "enclave_server" / "server.py"
    original = server.read_bytes()
    changed = original.replace(b'"""The enclave server', b'"""the enclave server', 1)
    assert sum(a != b for a, b in zip(original, changed, strict=True)) == 1
    server.write_bytes(changed)
    evil = runtime.build(output=str(out / "evil.eif"), source=str(src))
    return {"good": good, "again": again, "evil": evil, "dir": out}


@pytest.fixture
def home(tmp_path_factory, monkeypatch):
    """A fresh ENCLAVE_HOME; afterwards `down` for it, and nothing of it may be left running."""
    home = tmp_path_factory.mktemp("eh")
    monkeypatch.setenv("ENCLAVE_HOME", str(home))
    yield home
    cloud.down(home=home)
    # The supervisors name their enclave's directory, which is under the home's runtime directory.
    left = {**processes_mentioning(str(home)), **processes_mentioning(str(settings.runtime_dir(home)))}
    for pid in left:  # never leave anything behind, even when the assertion below fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def cloud_up(home, images, tmp_path):
    """The local cloud, an owner key that releases to the good image's PCR0 only, and a sealed package."""
    running = cloud.up(home=home)
    owner = boto3.client("kms", endpoint_url=running["kms_endpoint_url"], region_name="us-east-1",
                         **issued("owner", running["kms_credentials"]))  # fmt: skip
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    policy = render_policy(
        account_id=ACCOUNT,
        user_principals=[cloud.PRINCIPALS["enclave-host"]],  # the host, in the user's own account
        admin_principals=[f"arn:aws:iam::{ACCOUNT}:role/owner"],
        pcr0=[images["good"].measurements.pcr0],
    )
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    app = tmp_path / "app"
    app.mkdir()
    for name, body in APP.items():
        (app / name).write_text(textwrap.dedent(body))
    published = tmp_path / "published"
    published.mkdir()
    package_seal.seal(app, published / "app.pkg", kms_client=owner, key_id=key_id, name="app", version="1.0")
    return {**running, "published": published}


def start(images, which="good", **options) -> tuple:
    info = LocalRuntime().run(images[which].image, cpu_count=1, memory_mib=128, **options)
    return info, images[which].measurements.pcr0


def run_job(info, pcr0, published, script, args=()):
    """Push the package and run script; (summary, stdout text)."""
    out = []
    with EnclaveClient(info.endpoint, expect_pcr0=pcr0) as client:
        client.push(published, "/encrypted")
        summary = client.run("app.pkg", script, list(args), kms=user_kms(), on_output=lambda n, d: out.append(d))
    return summary, b"".join(out).decode()


# ---------------------------------------------------------------- images


def test_build_is_reproducible_and_measures_the_code(images, home):
    good, again, evil = images["good"], images["again"], images["evil"]
    assert Path(good.image).read_bytes() == Path(again.image).read_bytes()
    assert good.measurements == again.measurements
    assert evil.measurements.pcr0 != good.measurements.pcr0
    assert evil.measurements.pcr2 != good.measurements.pcr2  # the application changed...
    assert evil.measurements.pcr1 == good.measurements.pcr1  # ...not the interpreter or the dependencies

    # The CLI prints nitro-cli's shape, and another process builds the same bytes.
    output = images["dir"] / "cli.eif"
    run = subprocess.run([*ENCLAVE_CLI, "local", "build", "--output", str(output)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    printed = json.loads(run.stdout)
    assert printed == {"Measurements": good.measurements.to_json()}
    assert printed["Measurements"]["HashAlgorithm"].startswith("Sha384")
    assert output.read_bytes() == Path(good.image).read_bytes()

    # The documented definitions, checked with the standard tools.
    def sha384sum(*args, **kw):
        return subprocess.run(["sha384sum", *args], capture_output=True, text=True, check=True, **kw).stdout

    unpacked = images["dir"] / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", good.image, "-C", str(unpacked)], check=True)
    assert sha384sum(good.image).split()[0] == good.measurements.pcr0
    assert sha384sum(str(unpacked / "runtime.json")).split()[0] == good.measurements.pcr1
    files = sorted(p.relative_to(unpacked / "app").as_posix() for p in (unpacked / "app").rglob("*") if p.is_file())
    listing = sha384sum(*files, cwd=unpacked / "app")
    assert sha384sum(input=listing).split()[0] == good.measurements.pcr2
    # The image carries the enclave code, never the host-side CLI or local runtime.
    assert any(f.endswith("enclave_server/server.py") for f in files)
    assert not any("/cli/" in f or "/enclave_local/" in f for f in files)
    runtime = json.loads((unpacked / "runtime.json").read_text())
    carried = {d["name"] for d in runtime["dependencies"]}
    assert {"cryptography", "cbor2", "boto3", "botocore"} <= carried
    # Only the owner's seal imports Tink and tqdm: the enclave's open does not, so the image leaves them out.
    assert not {"tink", "protobuf", "tqdm"} & carried


def test_a_dependency_change_changes_the_measurement(images, home, tmp_path):
    """Another build of a locked distribution (here cbor2, shadowed on sys.path) changes PCR1 and PCR0,
    and an image built against the old one is refused on a host that has the new one."""
    shadow = tmp_path / "shadow"
    dist_info = shadow / "cbor2-6.3.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: cbor2\nVersion: 6.3.0\n")
    (dist_info / "RECORD").write_text("cbor2/__init__.py,sha256=another-build,1\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), os.environ["PYTHONPATH"]]))
    output = tmp_path / "shadowed.eif"
    build = subprocess.run([*ENCLAVE_CLI, "local", "build", "--output", str(output)],
                           capture_output=True, text=True, check=True, env=env)  # fmt: skip
    shadowed = json.loads(build.stdout)["Measurements"]
    good = images["good"].measurements
    assert shadowed["PCR2"] == good.pcr2  # same code...
    assert shadowed["PCR1"] != good.pcr1 and shadowed["PCR0"] != good.pcr0  # ...on another dependency

    refused = subprocess.run(
        [*ENCLAVE_CLI, "local", "run-enclave", "--eif-path", images["good"].image, "--cpu-count", "1",
         "--memory", "64"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "does not match this host" in refused.stderr and "cbor2" in refused.stderr, refused.stderr
    assert LocalRuntime().describe() == []


# ---------------------------------------------------------------- key release


def test_only_the_measured_image_gets_the_key(images, cloud_up):
    good, good_pcr0 = start(images, "good", name="good")
    evil, evil_pcr0 = start(images, "evil", name="evil")
    assert good.cid != evil.cid

    summary, stdout = run_job(good, good_pcr0, cloud_up["published"], "hello.py")
    assert summary["rc"] == 0 and summary["ended_by"] == "exit"
    assert stdout == "hello from the enclave\n"

    with pytest.raises(RemoteError) as denied:
        run_job(evil, evil_pcr0, cloud_up["published"], "hello.py")
    message = str(denied.value)
    assert "AccessDeniedException" in message and evil_pcr0 in message, message


# ---------------------------------------------------------------- isolation


def host_address() -> str | None:
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    for link in json.loads(out):
        for addr in link.get("addr_info", ()):
            if addr.get("scope") == "global":
                return addr["local"]
    return None


def test_enclave_is_isolated_from_the_host(images, cloud_up, home):
    info, pcr0 = start(images)
    listener = socket.create_server(("0.0.0.0", 0))  # something on the host that the host itself can reach
    port = listener.getsockname()[1]
    targets = [f"127.0.0.1:{port}", f"127.0.0.1:{cloud_up['kms_port']}"]
    address = host_address()
    if address:
        targets.append(f"{address}:{port}")
    for target in targets:
        host, target_port = target.rsplit(":", 1)
        socket.create_connection((host, int(target_port)), timeout=5).close()  # reachable from the host
    try:
        summary, stdout = run_job(info, pcr0, cloud_up["published"], "probe.py", targets)
    finally:
        listener.close()
    assert summary["rc"] == 0, stdout
    report = json.loads(stdout)

    # No TCP path out: the enclave's loopback is its own, and it has no other network.
    assert report["tcp"][f"127.0.0.1:{port}"] == "ConnectionRefusedError"
    assert report["tcp"][f"127.0.0.1:{cloud_up['kms_port']}"] == "ConnectionRefusedError"
    if address:
        assert report["tcp"][f"{address}:{port}"] == "OSError"  # ENETUNREACH: no route at all

    # Its /proc shows its own PID namespace only: init, the server, the job.
    processes = report["processes"]
    assert "enclave_local.runtime init" in processes["1"]
    assert all(
        "enclave_local.runtime init" in cmd or "enclave_server" in cmd or "job bootstrap" in cmd
        for cmd in processes.values()
    ), processes
    assert str(os.getpid()) not in processes or "pytest" not in processes[str(os.getpid())]

    # It runs without capabilities: no device nodes (such as the host's disk) to open. Boot dropped what
    # it used (mounts, network, capabilities) from the bounding set; the job, another uid, holds none of
    # what the server kept (the KMS forwarder's port 443, and SERVER_CAPS to run jobs).
    assert report["mknod"] == "PermissionError"
    caps = report["capabilities"]
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapInh"] == caps["CapAmb"] == "0" * 16, caps
    # setuid 6, setgid 7, chown 0, dac_override 1, net_bind_service 10
    assert caps["CapBnd"] == f"{(1 << 10) | (1 << 7) | (1 << 6) | (1 << 1) | 1:016x}", caps

    # The job runs as the job uid: it cannot open the NSM, get KMS through the forwarder, read the server's
    # memory or write to /tmp.
    assert report["uid"] == 65534
    assert report["nsm"] == report["nsm_socket"] == "PermissionError", report
    assert report["forwarder"] in ("closed", "ConnectionResetError"), report  # closed unread: a reset
    assert report["server_memory"] == "PermissionError", report
    assert report["tmp"] == "PermissionError", report

    # The plaintext lives on a tmpfs the host's mount namespace does not have.
    assert report["plaintext"].startswith("/enclave/work/")
    host_mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    assert not any(line.split()[2] == report["plaintext_device"] for line in host_mounts)
    assert not any("/enclave/work" in line.split()[4] for line in host_mounts)
    assert not Path(report["plaintext"]).exists()


# ---------------------------------------------------------------- lifecycle


def enclave_init(info, home) -> int:
    """The enclave's PID 1, seen from the host."""
    return json.loads((LocalRuntime(home).enclaves_dir / info.enclave_id / "enclave.json").read_text())["init"]["pid"]


def test_killing_the_enclave_mid_job(images, cloud_up, home):
    runtime = LocalRuntime()
    info, pcr0 = start(images)
    record = json.loads((LocalRuntime(home).enclaves_dir / info.enclave_id / "enclave.json").read_text())
    supervisor = Proc.from_json(record["supervisor"])
    client = EnclaveClient(info.endpoint, expect_pcr0=pcr0)
    client.push(cloud_up["published"], "/encrypted")
    spinning, outcome = threading.Event(), {}

    def job():
        try:
            outcome["summary"] = client.run("app.pkg", "spin.py", kms=user_kms(), on_output=lambda n, d: spinning.set())
        except EnclaveError as err:
            outcome["error"] = err

    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert spinning.wait(60), "the job never started"
        init = enclave_init(info, home)
        namespace = os.readlink(f"/proc/{init}/ns/mnt")
        assert namespace != os.readlink("/proc/self/ns/mnt")
        os.kill(init, signal.SIGKILL)
        worker.join(60)
    finally:
        client.close()
    assert isinstance(outcome.get("error"), ConnectionClosedError), outcome
    assert "closed the connection" in str(outcome["error"])

    assert supervisor.wait(30), "the supervisor did not notice its enclave died"
    assert runtime.describe() == []
    assert not (LocalRuntime(home).enclaves_dir / info.enclave_id).exists()
    # Nothing holds the enclave's mount namespace any more: its share and plaintext tmpfs are gone.
    assert holders_of_namespace(namespace) == []

    again, pcr0 = start(images)
    summary, stdout = run_job(again, pcr0, cloud_up["published"], "hello.py")
    assert stdout == "hello from the enclave\n"


def test_four_enclaves_and_not_a_fifth(images, home):
    runtime = LocalRuntime()
    started = [runtime.run(images["good"].image, cpu_count=1, memory_mib=64, name=f"e{i}") for i in range(MAX_ENCLAVES)]
    assert sorted(info.cid for info in started) == list(range(16, 16 + MAX_ENCLAVES))
    assert len({info.endpoint for info in started}) == MAX_ENCLAVES
    for info in started:
        with EnclaveClient(info.endpoint) as client:
            assert client.call("health")["server"]

    image = images["good"].image
    fifth = subprocess.run(
        [*ENCLAVE_CLI, "local", "run-enclave", "--eif-path", image, "--cpu-count", "1", "--memory", "64"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert fifth.returncode == 1
    assert f"already runs {MAX_ENCLAVES} local enclaves" in fifth.stderr and "terminate" in fifth.stderr

    described = json.loads(
        subprocess.run([*ENCLAVE_CLI, "local", "describe-enclaves"], capture_output=True, text=True, check=True).stdout
    )
    assert sorted(d["EnclaveCID"] for d in described) == list(range(16, 16 + MAX_ENCLAVES))
    assert {d["State"] for d in described} == {"RUNNING"} and {d["Flags"] for d in described} == {"NONE"}
    with pytest.raises(EnclaveError, match="4 enclaves are running"):
        discover_local_endpoint()

    one = subprocess.run(
        [*ENCLAVE_CLI, "local", "terminate-enclave", "--enclave-id", started[0].enclave_id],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(one.stdout) == {"EnclaveID": started[0].enclave_id, "Terminated": True}
    assert not (LocalRuntime(home).enclaves_dir / started[0].enclave_id).exists()

    # A supervisor that dies takes its enclave with it, and is reaped: not listed, nothing left.
    crashed = started[1]
    record = json.loads((LocalRuntime(home).enclaves_dir / crashed.enclave_id / "enclave.json").read_text())
    supervisor = Proc.from_json(record["supervisor"])
    os.kill(supervisor.pid, signal.SIGKILL)
    assert supervisor.wait(30)
    assert [i.enclave_id for i in runtime.describe()] == [i.enclave_id for i in started[2:]]
    assert not (LocalRuntime(home).enclaves_dir / crashed.enclave_id).exists()
    assert processes_mentioning(crashed.enclave_id) == {}

    rest = subprocess.run([*ENCLAVE_CLI, "local", "terminate-enclave", "--all"], capture_output=True, text=True,
                          check=True)  # fmt: skip
    printed = json.loads(rest.stdout)  # one JSON array for --all, as nitro-cli prints it
    assert isinstance(printed, list)
    assert sorted(r["EnclaveID"] for r in printed) == sorted(i.enclave_id for i in started[2:])
    assert all(r["Terminated"] is True for r in printed)
    assert runtime.describe() == []
    assert list(runtime.enclaves_dir.iterdir()) == [runtime.enclaves_dir / ".lock"]


def test_debug_mode_attests_zero_pcrs_and_keeps_a_console(images, home, monkeypatch):
    runtime = LocalRuntime()
    debug = runtime.run(images["good"].image, cpu_count=1, memory_mib=64, debug_mode=True, name="debug")
    assert debug.debug_mode and debug.to_json()["Flags"] == "DEBUG_MODE"
    monkeypatch.delenv("ENCLAVE_ENDPOINT", raising=False)
    monkeypatch.delenv("ENCLAVE_BACKEND", raising=False)
    assert resolve_endpoint() == discover_local_endpoint() == debug.endpoint
    with EnclaveClient(debug.endpoint, allow_debug=True) as client:
        document = client.attest()
    assert document.debug_mode
    assert [document.pcr_hex(i) for i in (0, 1, 2)] == [ZERO_PCR] * 3
    # The CLI finds the one local enclave by itself.
    attested = subprocess.run([*ENCLAVE_CLI, "attest", "--allow-debug", "--json"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    assert set(json.loads(attested.stdout)["pcrs"].values()) == {ZERO_PCR}
    assert "enclave server listening" in runtime.console("debug")

    production = runtime.run(images["good"].image, cpu_count=1, memory_mib=64, name="production")
    with EnclaveClient(production.endpoint, expect_pcr0=images["good"].measurements.pcr0) as client:
        assert client.attested.pcr_hex(0) == images["good"].measurements.pcr0
    with pytest.raises(EnclaveRuntimeError, match="not started in debug mode"):
        runtime.console(production.enclave_id)


def test_local_up_is_idempotent_and_down_leaves_nothing(home):
    def enclave(*args):
        return subprocess.run([*ENCLAVE_CLI, "local", *args], capture_output=True, text=True, check=True).stdout

    first = json.loads(enclave("up", "--json"))
    second = json.loads(enclave("up", "--json"))
    assert first["started"] and not second["started"]
    assert second["kms_endpoint_url"] == first["kms_endpoint_url"]
    assert json.loads((home / "cloud.json").read_text())["kms_endpoint_url"] == first["kms_endpoint_url"]
    # `up` issued the principals' credentials: an AWS shared-credentials file, 0600 in the 0700 state directory.
    credentials = Path(first["kms_credentials"])
    assert credentials == home / "kms" / "credentials"
    assert (stat.S_IMODE(credentials.stat().st_mode), stat.S_IMODE(credentials.parent.stat().st_mode)) == (0o600, 0o700)
    assert set(load_credentials(credentials)) == {"owner", "enclave-host", "admin"}
    assert (home / "ca" / "root.pem").is_file()
    # Enclaves reach the HTTPS listener only; host tools keep plain HTTP, on the same keys.
    assert parse_allowlist((home / "vsock-proxy.yaml").read_text()) == [("127.0.0.1", first["kms_tls_port"])]
    kms = boto3.client("kms", endpoint_url=first["kms_endpoint_url"], region_name="us-east-1",
                       **issued("owner", first["kms_credentials"]))  # fmt: skip
    assert kms.list_keys()["Keys"] == []
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    tls = boto3.client("kms", endpoint_url=f"https://localhost:{first['kms_tls_port']}", region_name="us-east-1",
                       verify=first["tls_ca_bundle"], **issued("owner", first["kms_credentials"]))  # fmt: skip
    assert [k["KeyId"] for k in tls.list_keys()["Keys"]] == [key_id]

    moved = subprocess.run([*ENCLAVE_CLI, "local", "up", "--kms-port", str(first["kms_port"] + 1)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert moved.returncode == 1 and "enclave local down" in moved.stderr

    assert "stopped the local KMS" in enclave("down")
    assert processes_mentioning(str(home)) == {}
    assert not (home / "cloud.json").exists()
    assert "not running" in enclave("down")


# ---------------------------------------------------------------- vsock-proxy


def test_vsock_proxy_relays_only_to_allowed_destinations(tmp_path, caplog):
    upstream = socket.create_server(("127.0.0.1", 0))
    port = upstream.getsockname()[1]

    def echo_once():
        conn, _address = upstream.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data.upper())

    echo = threading.Thread(target=echo_once, daemon=True)
    echo.start()
    listen = f"unix://{tmp_path}/3_8000.sock"
    with VsockProxy(listen, "127.0.0.1", port, [("127.0.0.1", port)]), socket.socket(socket.AF_UNIX) as client:
        client.connect(f"{tmp_path}/3_8000.sock")
        client.sendall(b"kms request")
        client.shutdown(socket.SHUT_WR)
        assert b"".join(iter(lambda: client.recv(4096), b"")) == b"KMS REQUEST"
    echo.join(10)
    upstream.close()

    with pytest.raises(VsockProxyError, match="not in the allowlist"):
        VsockProxy(listen, "kms.us-east-1.amazonaws.com", 443, [("127.0.0.1", port)])
    assert any("refused" in r.getMessage() and "kms.us-east-1.amazonaws.com" in r.getMessage() for r in caplog.records)
    assert not Path(f"{tmp_path}/3_8000.sock").exists()


# ---------------------------------------------------------------- KMS over TLS, end to end

TLS_PROBE = """
import json, socket


def forwarder():  # a job is not the server: the forwarder closes its connection before any TLS
    with socket.create_connection(("kms.us-east-1.amazonaws.com", 443), timeout=10) as sock:
        sock.sendall(b"\\x16\\x03\\x01\\x00\\x00")
        try:
            return "relayed" if sock.recv(16) else "closed"
        except ConnectionResetError:
            return "closed"
print(json.dumps({"address": socket.gethostbyname("kms.us-east-1.amazonaws.com"), "forwarder": forwarder()}))
"""


def _handshake(port: int, context: ssl.SSLContext, name: str):
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname=name) as tls,
        ):
            return [value for _kind, value in tls.getpeercert()["subjectAltName"] if value == name]
    except ssl.SSLCertVerificationError as err:
        return err.verify_message


def test_kms_is_reached_by_name_over_tls_through_forwarder_and_proxy(images, cloud_up, tmp_path, home):
    """In the enclave, kms.<region> is the forwarder on loopback, which relays the server's key release (and
    no job's connection) through the vsock-proxy to a TLS server whose certificate for that name comes from
    the local TLS CA, and from nothing else."""
    info, pcr0 = start(images)
    owner = boto3.client("kms", endpoint_url=cloud_up["kms_endpoint_url"], region_name="us-east-1",
                         **issued("owner"))  # fmt: skip
    key_id = owner.list_keys()["Keys"][0]["KeyId"]
    app = tmp_path / "tls-app"
    app.mkdir()
    (app / "tls_probe.py").write_text(TLS_PROBE)
    package_seal.seal(app, cloud_up["published"] / "tls.pkg", kms_client=owner, key_id=key_id, name="tls", version="1")
    out = []
    with EnclaveClient(info.endpoint, expect_pcr0=pcr0) as client:
        client.push(cloud_up["published"], "/encrypted")
        # The package opened: the server's Decrypt went by name over TLS through forwarder and proxy.
        summary = client.run("tls.pkg", "tls_probe.py", [], kms=user_kms(), on_output=lambda n, d: out.append(d))
    assert summary["rc"] == 0, out
    report = json.loads(b"".join(out))
    assert report == {"address": "127.0.0.1", "forwarder": "closed"}
    # What the vsock-proxy relays to: the local KMS's HTTPS listener, as the enclave's boto3 checks it.
    cloud = json.loads((home / "cloud.json").read_text())
    port, local = cloud["kms_tls_port"], ssl.create_default_context(cafile=cloud["tls_ca_bundle"])
    assert _handshake(port, local, "kms.us-east-1.amazonaws.com") == ["kms.us-east-1.amazonaws.com"]
    assert "Hostname mismatch" in _handshake(port, local, "kms.example.com")
    assert "unable to get local issuer certificate" in _handshake(
        port, ssl.create_default_context(), "kms.eu-west-1.amazonaws.com"
    )


# ---------------------------------------------------------------- what the EIF boot needs, failing locally


def _tree_copy(dest: Path) -> Path:
    return copy_enclave_sources(dest)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} no longer holds {old!r}: update this test"
    path.write_text(text.replace(old, new, 1))


def _fails_to_start(tmp_path, home, name) -> str:
    image = LocalRuntime().build(output=str(tmp_path / f"{name}.eif"), source=str(tmp_path / "src"))
    with pytest.raises(EnclaveRuntimeError) as failed:
        LocalRuntime().run(image.image, cpu_count=1, memory_mib=64, name=name, debug_mode=True)
    assert LocalRuntime().describe() == []
    return str(failed.value)


def test_an_entrypoint_and_cmd_split_fails_at_start(tmp_path, home):
    # nitro-cli runs the Cmd alone: with the arguments in CMD and the program in ENTRYPOINT, the EIF runs
    # "--listen" and reboots. The local runtime follows the same rule and refuses to start.
    dockerfile = _tree_copy(tmp_path / "src") / "enclave_server" / "Dockerfile"
    _edit(dockerfile, 'CMD ["/usr/local/bin/python3", "-s", "-P", "-m", "ansible_collections.confidential_ml.nitro.'
          'enclave_server.boot", \\\n', 'ENTRYPOINT ["/usr/local/bin/python3", "-s", "-P", "-m", '
          '"ansible_collections.confidential_ml.nitro.enclave_server.boot"]\nCMD [\\\n')  # fmt: skip
    message = _fails_to_start(tmp_path, home, "split")
    assert "the image's command starts with '--listen', not the image's Python" in message, message


def test_an_image_that_leaves_loopback_down_fails_at_start(tmp_path, home):
    boot = _tree_copy(tmp_path / "src") / "enclave_server" / "boot.py"
    _edit(boot, "    loopback_up()\n    write_hosts(hosts)", "    write_hosts(hosts)")
    message = _fails_to_start(tmp_path, home, "nolo")
    assert "the KMS forwarder on 127.0.0.1:443 cannot be reached (Network is unreachable): is loopback up?" in message


def test_an_image_that_leaves_kms_to_dns_fails_at_start(tmp_path, home):
    boot = _tree_copy(tmp_path / "src") / "enclave_server" / "boot.py"
    _edit(boot, "hosts.write(kms_forwarder.hosts_file())", 'hosts.write("127.0.0.1 localhost\\n")')
    message = _fails_to_start(tmp_path, home, "nodns")
    assert ".amazonaws.com does not resolve" in message and "no DNS" in message, message


def test_host_only_code_leaves_pcr0_alone_and_server_code_does_not(images, tmp_path):
    src = _tree_copy(tmp_path / "src")
    with open(src / "plugins" / "module_utils" / "mounts.py", "a") as f:
        f.write("# a host-side edit\n")
    fuse = LocalRuntime(tmp_path / "home").build(output=str(tmp_path / "fuse.eif"), source=str(src))
    assert fuse.measurements == images["good"].measurements
    assert images["evil"].measurements.pcr0 != images["good"].measurements.pcr0  # server.py, one byte


def test_a_host_answering_for_kms_sees_only_tls_and_gets_no_request(images, cloud_up, home, tmp_path):
    """The host swaps the enclave's way to KMS (its 3_8000.sock) for a server of its own, with a
    certificate for the KMS name from a CA of its own: it sees a TLS ClientHello, never a request,
    and the job fails on the certificate."""
    info, pcr0 = start(images)
    attacker = LocalTlsCA.load_or_create(tmp_path / "attacker")
    cert, key = attacker.issue_server(["kms.us-east-1.amazonaws.com"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    socket_path = settings.runtime_dir(home) / "enclaves" / info.enclave_id / "vsock" / "3_8000.sock"
    socket_path.unlink()  # the host owns that directory: the supervisor's vsock-proxy is bypassed
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(socket_path))
    listener.listen()
    seen = {"first_bytes": [], "handshakes": [], "requests": []}

    def fake_kms():
        while True:
            try:
                conn, _address = listener.accept()
            except OSError:
                return
            with conn:
                seen["first_bytes"].append(conn.recv(5, socket.MSG_PEEK))
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        seen["handshakes"].append("completed")
                        seen["requests"].append(tls.recv(4096))
                except (ssl.SSLError, OSError) as err:
                    seen["handshakes"].append(type(err).__name__)

    thread = threading.Thread(target=fake_kms, daemon=True)
    thread.start()
    try:
        with pytest.raises(RemoteError) as failed:
            run_job(info, pcr0, cloud_up["published"], "hello.py")
    finally:
        listener.close()
        thread.join(10)
    assert "SSL validation failed for https://kms.us-east-1.amazonaws.com/" in str(failed.value), failed.value
    assert "certificate verify failed" in str(failed.value)
    assert seen["first_bytes"] and all(first[:1] == b"\x16" for first in seen["first_bytes"]), seen  # TLS records
    assert "completed" not in seen["handshakes"] and seen["requests"] == [], seen


def test_the_local_command_substitutes_only_the_interpreter_and_vsock_addresses():
    command = {"argv": [IMAGE_PYTHON, "-P", "-m", "server", "--listen", "vsock://any:5000", "--kms-proxy",
                        "vsock://3:8000", "--nsm", "/dev/nsm", "--note", "vsock-like but not an address"]}  # fmt: skip
    assert local_command(command, cid=17, vsock_dir="/run/vsock") == [
        sys.executable, "-P", "-m", "server", "--listen", "unix:///run/vsock/17_5000.sock", "--kms-proxy",
        "unix:///run/vsock/3_8000.sock", "--nsm", "/dev/nsm", "--note", "vsock-like but not an address",
    ]  # fmt: skip
    # Anything else as argv[0] stays, and init looks it up as the enclave's init would.
    assert local_command({"argv": ["--listen", "vsock://any:5000"]}, cid=17, vsock_dir="/run/vsock")[0] == "--listen"
    with pytest.raises(EnclaveError):
        local_command({"argv": [IMAGE_PYTHON, "vsock://nope:x"]}, cid=17, vsock_dir="/run/vsock")
