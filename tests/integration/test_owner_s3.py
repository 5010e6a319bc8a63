"""owner.yml publishing the release to S3, and a host fetching it from there, against moto's server on 127.0.0.1
(a random port).

The first run must put release.json, the enclave image and every package in the bucket, byte for byte what
it published locally (SHA-256), with the image's SHA-384 equal to the PCR0 the release names and the
package's SHA-256 equal to the one release.json records. A second run must change nothing and upload
nothing (changed=0, every object left as it was).

The enclave image is built from a snapshot of the enclave sources, so both runs measure the same code even
while the checkout is being edited: the second run then has nothing to upload. The module's tests share the
first run (s3_release): the host test fetches what it published.
"""

import hashlib
import io
import json
import re
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_format
from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import OwnerIdentity
from ansible_collections.confidential_ml.nitro.tests.fixtures.cloud import fresh_cloud
from ansible_collections.confidential_ml.nitro.tests.fixtures.sources import copy_enclave_sources
from ansible_collections.confidential_ml.nitro.tests.fixtures.ssh_fleet import running

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "confidential-ml-releases"
PREFIX = "release/"
PACKAGE = "digits-classifier"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    """moto's server on 127.0.0.1; its endpoint URL."""
    tmp_path = tmp_path_factory.mktemp("moto")
    for _attempt in range(3):
        port = free_port()
        log = (tmp_path / "moto.log").open("w")
        server = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and server.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        if server.poll() is None:
            break
        log.close()  # the port was taken in between: try another
    else:
        pytest.fail(f"moto's server would not start: {(tmp_path / 'moto.log').read_text()[-2000:]}")
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)
    log.close()


def owner_playbook(env: dict, work: Path, endpoint: str) -> str:
    """owner.yml's output, run as the owner (the local KMS's credentials; moto's S3 takes any)."""
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "playbooks/owner.yml",
         "-e", f"owner_pipeline_workdir={work / 'owner'}",
         "-e", f"owner_pipeline_image_source={work / 'src'}",
         "-e", "owner_pipeline_publish_to=s3",
         "-e", f"owner_pipeline_s3_bucket={BUCKET}",
         "-e", f"owner_pipeline_s3_prefix={PREFIX}",
         "-e", f"owner_pipeline_s3_endpoint_url={endpoint}"],
        cwd=ROOT, env={**env, "AWS_PROFILE": "owner"}, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"owner.yml exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def changed_count(output: str) -> int:
    found = re.search(r"^localhost\s+:\s+ok=\d+\s+changed=(\d+)", output, flags=re.MULTILINE)
    assert found, f"no PLAY RECAP line for localhost in:\n{output[-3000:]}"
    return int(found.group(1))


@pytest.fixture(scope="module")
def s3_release(moto_s3):
    """(work, env, output): a local cloud of its own in which owner.yml published the release to moto's S3 once for
    this module's tests (output is that run's); the image is built from a snapshot of the sources. The release in S3
    must be as published when a test ends."""
    with fresh_cloud() as (work, env):
        copy_enclave_sources(work / "src")
        yield work, env, owner_playbook(env, work, moto_s3)


def test_owner_publishes_the_release_to_s3_and_a_second_run_uploads_nothing(moto_s3, s3_release):
    work, env, first = s3_release
    assert changed_count(first) > 0

    published = work / "owner" / "release"
    release = json.loads((published / "release.json").read_text())
    s3 = boto3.client(
        "s3", endpoint_url=moto_s3, region_name="us-east-1", aws_access_key_id="owner", aws_secret_access_key="x"
    )
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("Contents", [])
    keys = {o["Key"] for o in listed}
    package_file = f"packages/{PACKAGE}.pkg"
    expected = {PREFIX + "release.json", PREFIX + release["image"]["file"], PREFIX + package_file}
    assert keys == expected, f"the bucket holds {sorted(keys)}, expected {sorted(expected)}"
    assert [p["file"] for p in release["packages"]] == [package_file]

    bodies = {}
    for key in sorted(keys):
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        local = (published / key.removeprefix(PREFIX)).read_bytes()
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(local).hexdigest(), f"{key} differs from {local}"
        bodies[key] = body
    assert hashlib.sha256(bodies[PREFIX + package_file]).hexdigest() == release["packages"][0]["sha256"]
    # On the local backend PCR0 is the SHA-384 of the image file, as on Nitro it is the EIF's measurement.
    image = bodies[PREFIX + release["image"]["file"]]
    assert hashlib.sha384(image).hexdigest() == release["image"]["measurements"]["pcr0"]
    assert json.loads(bodies[PREFIX + "release.json"]) == release
    # The image is bound to the owner's signing key that release.json publishes, and the package is signed by it.
    (signing,) = release["signing_keys"]
    assert signing["key_id"].startswith("arn:aws:kms:") and len(signing["fingerprint"]) == 64
    header = package_format.read_header(published / package_file)
    assert (header.signer_key_id, header.signer_fingerprint.hex()) == (signing["key_id"], signing["fingerprint"])
    with tarfile.open(fileobj=io.BytesIO(image)) as tar:
        carried = tar.extractfile("app/ansible_collections/confidential_ml/nitro/owner_identity.json").read()
    assert [key.to_json() for key in OwnerIdentity.loads(carried).keys] == [signing]

    before = {o["Key"]: (o["ETag"], o["LastModified"]) for o in listed}
    second = owner_playbook(env, work, moto_s3)
    assert changed_count(second) == 0, f"the second owner.yml run changed something:\n{second[-6000:]}"
    after = {
        o["Key"]: (o["ETag"], o["LastModified"])
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("Contents", [])
    }
    assert after == before, f"the second run uploaded again: before {before}, after {after}"
    # the signing key was made once: the second run found it (changed=0 above) and bound the same key
    assert json.loads((published / "release.json").read_text())["signing_keys"] == [signing]


@pytest.mark.timeout(1500)  # two runs of run_job.yml over SSH, beyond 600 s under load
def test_a_host_fetches_the_release_from_s3_and_a_tampered_image_in_s3_is_refused(moto_s3, s3_release, fleet_wheel):
    """The release from S3 on the host (issue 15): owner.yml publishes to S3; run_job.yml with release_s3_bucket on
    enclave-a of the SSH test fleet (one host: the fetch is per host, and three cost three times the time), whose
    file system has neither the checkout nor the owner's release folder. The host fetches image and packages with
    its own credentials, the controller fetches release.json into a folder of its own; the job's receipt verifies
    there. Then the job runs again (run_again: the first run's receipt would skip it) on a tampered image: the
    owner's image in S3 with 512 bytes appended (still a valid archive, so its enclave starts, with another PCR0);
    the job is refused by the PCR0 check before anything is pushed, with a plain error naming both PCR0s, and the
    controller's release.json is unchanged."""
    work, env, _output = s3_release
    published = json.loads((work / "owner" / "release" / "release.json").read_text())
    controller_release, jobs = work / "s3-release", work / "jobs"
    s3_vars = ["-e", f"release_s3_bucket={BUCKET}", "-e", f"release_s3_prefix={PREFIX}",
               "-e", f"release_s3_endpoint_url={moto_s3}", "-e", f"release_dir={controller_release}",
               "-e", f"job_dir={jobs}/{{{{ inventory_hostname }}}}", "--limit", "enclave-a"]  # fmt: skip
    masked = [work / "owner", work / "src", jobs, controller_release]
    with running(work / "hosts", env, fleet_wheel, masked) as (fleet, fleet_env):
        host_env = {**fleet_env, "AWS_PROFILE": "enclave-host"}
        image = None  # the image as published, once the test tampers with it in S3
        try:
            run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(fleet.inventory), "playbooks/run_job.yml",
                                  *s3_vars], cwd=ROOT, env=host_env, capture_output=True, text=True, timeout=900,
                                 check=False)  # fmt: skip
            assert run.returncode == 0, f"run_job.yml from S3 failed:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
            assert "Fetch the release's image from S3 to the host" in run.stdout
            assert json.loads((controller_release / "release.json").read_text()) == published
            assert sorted(p.name for p in controller_release.iterdir()) == [
                "release.json"
            ]  # no image on the controller
            verified = subprocess.run(
                [str(BIN / "enclave"), "receipt", "verify", str(jobs / "enclave-a" / "receipt.json"), "--release",
                 str(controller_release / "release.json"), "--outputs", str(jobs / "enclave-a" / "output"), "--json"],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert verified.returncode == 0, verified.stderr
            assert json.loads(verified.stdout)["rc"] == 0

            s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1", aws_access_key_id="owner",
                              aws_secret_access_key="x")  # fmt: skip
            image_key = PREFIX + published["image"]["file"]
            image = s3.get_object(Bucket=BUCKET, Key=image_key)["Body"].read()
            tampered = image + bytes(512)
            s3.put_object(Bucket=BUCKET, Key=image_key, Body=tampered)
            refused = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(fleet.inventory),
                                      "playbooks/run_job.yml", *s3_vars, "-e", "clear_output=true",
                                      "-e", "run_again=true"],
                                     cwd=ROOT, env=host_env, capture_output=True, text=True, timeout=900,
                                     check=False)  # fmt: skip
            assert refused.returncode == 2, refused.stdout[-6000:]
            pcr0 = published["image"]["measurements"]["pcr0"]
            message = f"PCR0 is {hashlib.sha384(tampered).hexdigest()}, expected one of {pcr0}"
            assert message in refused.stdout, refused.stdout[-6000:]
            assert "TASK [Copy the owner's packages into the enclave's /encrypted]" in refused.stdout.split(message)[0]
            assert json.loads((controller_release / "release.json").read_text()) == published
        finally:
            if image is not None:  # the release in S3 as published, for the module's other tests
                s3.put_object(Bucket=BUCKET, Key=image_key, Body=image)
            cleanup = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(fleet.inventory),
                                      "playbooks/cleanup.yml"], cwd=ROOT, env=host_env, capture_output=True,
                                     text=True, timeout=600, check=False)  # fmt: skip
            assert cleanup.returncode == 0, cleanup.stdout[-3000:]
