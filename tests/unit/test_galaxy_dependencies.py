"""galaxy.yml's `dependencies` cover every collection the roles, playbooks, inventories and molecule scenarios
use, and the installed ansible package carries each at a version in its range: `ansible-galaxy collection install
confidential_ml.nitro` must bring everything the collection's own content calls.

A use is a module or action key of a task (`amazon.aws.kms_key:`, `action:`), a role (`roles:`,
`import_role`/`include_role` name), an inventory `plugin:`, or a lookup, filter or test in a template
expression (`lookup('ns.coll.x', ...)`, `| ns.coll.x`, `is ns.coll.x`)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from ansible.galaxy.dependency_resolution.versioning import meets_requirements

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("roles", "playbooks", "extensions", "inventory")
THIS = "confidential_ml.nitro"
BUILTIN = {"ansible.builtin", "ansible.legacy"}  # ansible-core itself

FQCN = re.compile(r"([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)")
# Keys whose (scalar) value names a plugin: `action: ns.coll.mod args`, an inventory's `plugin:`.
PLUGIN_KEYS = {"action", "local_action", "plugin"}
# Keys whose value names roles: a play's `roles:` list, and import_role/include_role's mapping (`name:`).
ROLE_KEYS = {"roles", "import_role", "include_role"}
# Template expressions: lookup('x.y.z' / query( / q( , filters `| x.y.z`, tests `is x.y.z`.
IN_TEMPLATE = re.compile(
    r"""(?:\b(?:lookup|query|q)\(\s*['"]|\|\s*|\bis\s+(?:not\s+)?)"""
    r"([a-z][a-z0-9_]*\.[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*)\b"
)


def _named(node: yaml.Node, found: list[tuple[str, int]]) -> None:
    """A scalar whose first word names a plugin or role."""
    if isinstance(node, yaml.ScalarNode) and isinstance(node.value, str) and node.value.split():
        head = node.value.split()[0]
        if FQCN.fullmatch(head):
            found.append((head, node.start_mark.line + 1))


def _uses_in(node: yaml.Node, names_roles: bool, found: list[tuple[str, int]]) -> None:
    """Every FQCN node uses. names_roles: node is a role list (`roles:`) or a role's own mapping."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) and isinstance(key.value, str) else ""
            if FQCN.fullmatch(name):  # a task's module or action
                found.append((name, key.start_mark.line + 1))
            if name in PLUGIN_KEYS or (names_roles and name in ("role", "name")):
                _named(value, found)
            if name != "hosts":  # an inventory's host names may look like FQCNs (node1.example.com)
                _uses_in(value, name.rsplit(".", 1)[-1] in ROLE_KEYS, found)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            if names_roles:  # `roles: [ns.coll.role]`, or a mapping with role:/name:
                _named(item, found)
            _uses_in(item, names_roles, found)
    elif isinstance(node, yaml.ScalarNode) and isinstance(node.value, str):
        found.extend((match, node.start_mark.line + 1) for match in IN_TEMPLATE.findall(node.value))


def used_collections(root: Path) -> dict[str, list[str]]:
    """{collection: ["file:line (fqcn)", ...]} for every FQCN the YAML under root's SCANNED folders uses."""
    used: dict[str, list[str]] = {}
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix not in (".yml", ".yaml") or not path.is_file():
                continue
            found: list[tuple[str, int]] = []
            for document in yaml.compose_all(path.read_text(), Loader=yaml.SafeLoader):
                if document is not None:
                    _uses_in(document, False, found)
            for fqcn, line in found:
                collection = ".".join(fqcn.split(".")[:2])
                used.setdefault(collection, []).append(f"{path.relative_to(root)}:{line} ({fqcn})")
    return used


def undeclared(root: Path) -> list[str]:
    """One line per collection used under root but neither this one, ansible-core's, nor a galaxy.yml dependency."""
    declared = set((yaml.safe_load((root / "galaxy.yml").read_text()) or {}).get("dependencies") or {})
    problems = []
    for collection, where in sorted(used_collections(root).items()):
        if collection in BUILTIN or collection == THIS or collection in declared:
            continue
        problems.append(
            f"{', '.join(where)} use(s) collection {collection}, which galaxy.yml does not declare: add "
            f'`{collection}: ">=X.Y.Z,<NEXT.0.0"` under dependencies (the range the tests run)'
        )
    return problems


def installed_version(collection: str) -> str | None:
    """The version of collection the Python environment's ansible package carries (its MANIFEST.json)."""
    try:
        spec = importlib.util.find_spec(f"ansible_collections.{collection}")
    except ModuleNotFoundError:
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        manifest = Path(location) / "MANIFEST.json"
        if manifest.is_file():
            return json.loads(manifest.read_text())["collection_info"]["version"]
    return None


def unmet(root: Path) -> list[str]:
    """One line per galaxy.yml dependency the installed ansible package lacks or carries outside its range."""
    dependencies = (yaml.safe_load((root / "galaxy.yml").read_text()) or {}).get("dependencies") or {}
    problems = []
    for collection, requirement in sorted(dependencies.items()):
        version = installed_version(collection)
        if version is None:
            problems.append(f"galaxy.yml depends on {collection} {requirement}, which is not installed")
        elif not meets_requirements(version, str(requirement)):
            problems.append(
                f"galaxy.yml depends on {collection} {requirement}, but {version} is installed: the tests run "
                f"{version}, so widen the range to include it (or install a version in the range)"
            )
    return problems


# ------------------------------------------------------------------ the collection itself


def test_galaxy_yml_declares_every_collection_the_roles_and_playbooks_use():
    used = used_collections(ROOT)
    assert "amazon.aws" in used, "the owner's pipeline calls amazon.aws (kms_key, s3_bucket, s3_object)"
    assert THIS in used
    assert undeclared(ROOT) == []


def test_the_installed_ansible_carries_each_dependency_in_its_range():
    assert unmet(ROOT) == []


# ------------------------------------------------------------------ the check fails on a real miss


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the collection's YAML content and galaxy.yml, to break."""
    for folder in SCANNED:
        shutil.copytree(ROOT / folder, tmp_path / folder)
    shutil.copy(ROOT / "galaxy.yml", tmp_path / "galaxy.yml")
    assert undeclared(tmp_path) == []
    return tmp_path


def test_a_role_using_an_undeclared_collection_fails_naming_the_file_and_the_collection(tree: Path):
    tasks = tree / "roles" / "firewall" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "main.yml").write_text(
        "---\n- name: Open the port\n  community.general.ufw:\n    rule: allow\n    port: '8000'\n"
    )
    (problem,) = undeclared(tree)
    assert "roles/firewall/tasks/main.yml:3 (community.general.ufw)" in problem
    assert "collection community.general, which galaxy.yml does not declare" in problem


@pytest.mark.parametrize(
    "task",
    [
        "- ansible.builtin.debug:\n    msg: \"{{ lookup('community.hashi_vault.vault_read', 'secret/x') }}\"\n",
        "- ansible.builtin.set_fact:\n    x: \"{{ data | community.general.json_query('a') }}\"\n",
        "- ansible.builtin.assert:\n    that: x is ansible.utils.in_network('10.0.0.0/8')\n",
        "- action: community.crypto.openssl_privatekey path=/tmp/k\n",
        "- ansible.builtin.import_role:\n    name: community.zabbix.zabbix_agent\n",
    ],
    ids=["lookup", "filter", "test", "action", "import_role"],
)
def test_lookups_filters_tests_actions_and_roles_count_as_uses(tree: Path, task: str):
    (tree / "playbooks" / "extra.yml").write_text(f"---\n- hosts: all\n  tasks:\n{_indent(task)}")
    (problem,) = undeclared(tree)
    assert problem.startswith("playbooks/extra.yml:"), problem


def test_a_play_listing_an_undeclared_role_fails(tree: Path):
    (tree / "playbooks" / "extra.yml").write_text("---\n- hosts: all\n  roles:\n    - geerlingguy.mac.homebrew\n")
    (problem,) = undeclared(tree)
    assert "playbooks/extra.yml:4 (geerlingguy.mac.homebrew)" in problem


def test_an_inventory_plugin_of_an_undeclared_collection_fails(tree: Path):
    (tree / "inventory" / "gcp.yml").write_text("---\nplugin: google.cloud.gcp_compute\nprojects: [p]\n")
    (problem,) = undeclared(tree)
    assert "inventory/gcp.yml:2 (google.cloud.gcp_compute)" in problem


def test_declaring_the_collection_makes_the_miss_pass(tree: Path):
    (tree / "playbooks" / "extra.yml").write_text("---\n- hosts: all\n  tasks:\n    - community.general.ufw: {}\n")
    assert undeclared(tree)
    galaxy = yaml.safe_load((tree / "galaxy.yml").read_text())
    galaxy["dependencies"]["community.general"] = ">=10.0.0"
    (tree / "galaxy.yml").write_text(yaml.safe_dump(galaxy))
    assert undeclared(tree) == []


def test_a_range_the_installed_collection_misses_and_a_missing_collection_fail(tree: Path):
    installed = installed_version("amazon.aws")
    assert installed is not None
    major = int(installed.split(".")[0])
    galaxy = yaml.safe_load((tree / "galaxy.yml").read_text())
    galaxy["dependencies"] = {"amazon.aws": f">={major + 1}.0.0", "nonexistent.collection": "*"}
    (tree / "galaxy.yml").write_text(yaml.safe_dump(galaxy))
    assert unmet(tree) == [
        f"galaxy.yml depends on amazon.aws >={major + 1}.0.0, but {installed} is installed: the tests run "
        f"{installed}, so widen the range to include it (or install a version in the range)",
        "galaxy.yml depends on nonexistent.collection *, which is not installed",
    ]


def _indent(task: str) -> str:
    return "".join(f"    {line}\n" for line in task.splitlines())
