"""owner.yml publishing the release to S3, against moto's server on 127.0.0.1 (a random port).

The first run must put release.json, the enclave image and every package in the bucket, byte for byte what
it published locally (SHA-256), with the image's SHA-384 equal to the PCR0 the release names and the
package's SHA-256 equal to the one release.json records. A second run must change nothing and upload
nothing (changed=0, every object left as it was).

The enclave image is built from a snapshot of the enclave sources, so both runs measure the same code even
while the checkout is being edited: the second run then has nothing to upload.
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
from ansible_collections.confidential_ml.nitro.tests.fixtures.sources import copy_enclave_sources

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "confidential-ml-releases"
PREFIX = "release/"
PACKAGE = "digits-classifier"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_s3(tmp_path):
    """moto's server on 127.0.0.1; its endpoint URL."""
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
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "playbooks/owner.yml",
         "-e", f"owner_pipeline_workdir={work / 'owner'}",
         "-e", f"owner_pipeline_image_source={work / 'src'}",
         "-e", "owner_pipeline_publish_to=s3",
         "-e", f"owner_pipeline_s3_bucket={BUCKET}",
         "-e", f"owner_pipeline_s3_prefix={PREFIX}",
         "-e", f"owner_pipeline_s3_endpoint_url={endpoint}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"owner.yml exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def changed_count(output: str) -> int:
    found = re.search(r"^localhost\s+:\s+ok=\d+\s+changed=(\d+)", output, flags=re.MULTILINE)
    assert found, f"no PLAY RECAP line for localhost in:\n{output[-3000:]}"
    return int(found.group(1))


def test_owner_publishes_the_release_to_s3_and_a_second_run_uploads_nothing(moto_s3, local_cloud):
    work, env = local_cloud
    env["AWS_PROFILE"] = "owner"  # the local KMS's credentials (moto's S3 takes any)
    copy_enclave_sources(work / "src")
    first = owner_playbook(env, work, moto_s3)
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
