"""The dependency floors are stated once, in pyproject.toml (make test-lowest runs the unit tests on them);
what the modules' documentation says about versions must agree with it."""

import ast
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
        found[name.lower()] = version
    return found


def documented_requirements(module: Path) -> list[str]:
    tree = ast.parse(module.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DOCUMENTATION":
            return yaml.safe_load(node.value.value).get("requirements", [])
    return []


def test_every_direct_dependency_has_a_floor():
    assert set(floors()) == {
        "asn1crypto", "boto3", "botocore", "cbor2", "cryptography", "mfusepy", "pyyaml", "tink", "tqdm"
    }  # fmt: skip


def test_module_documentation_states_the_pyproject_floors():
    known = floors()
    checked = 0
    for module in sorted((ROOT / "plugins" / "modules").glob("*.py")):
        for line in documented_requirements(module):
            for name, version in re.findall(r"([A-Za-z0-9_.-]+) >= ([0-9.]+)", line):
                if name.lower() in known:
                    assert version == known[name.lower()], (
                        f"{module.name} documents {name} >= {version}; pyproject.toml's floor is {known[name.lower()]}"
                    )
                    checked += 1
    assert checked >= 4, "the modules document their libraries' versions"
