"""inventory/aws_ec2.yml (issue 15) selects the Nitro parent instances by tag, checked against moto's EC2 on
loopback: the tagged running instances, and only they, land in enclave_hosts on the nitro backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def plain(value):
    """A value as ansible-inventory --list prints it, without its untrusted-data marker."""
    return value["__ansible_unsafe"] if isinstance(value, dict) and "__ansible_unsafe" in value else value


@pytest.fixture
def moto_ec2():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_the_ec2_inventory_selects_the_tagged_parents(moto_ec2):
    ec2 = boto3.client("ec2", endpoint_url=moto_ec2, region_name="eu-west-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    ami = ec2.describe_images()["Images"][0]["ImageId"]

    def launch(tag: str) -> dict:
        tags = [{"ResourceType": "instance", "Tags": [{"Key": "confidential-ml", "Value": tag}]}]
        return ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, TagSpecifications=tags)["Instances"][0]

    parents = {i["InstanceId"]: i for i in (launch("enclave-host"), launch("enclave-host"))}
    other = launch("build-server")["InstanceId"]
    stopped = launch("enclave-host")["InstanceId"]
    ec2.stop_instances(InstanceIds=[stopped])

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_URL=moto_ec2, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    listed = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(ROOT / "inventory" / "aws_ec2.yml"), "--list"],
                            env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    inventory = json.loads(listed.stdout)
    assert sorted(inventory["enclave_hosts"]["hosts"]) == sorted(parents), (other, stopped, inventory)
    for instance_id, instance in parents.items():
        hostvars = inventory["_meta"]["hostvars"][instance_id]
        assert plain(hostvars["enclave_host_backend"]) == "nitro"
        assert plain(hostvars["ansible_host"]) == instance["PrivateIpAddress"]
