"""make test runs the suite under pytest-xdist (--dist loadgroup): tests/conftest.py keeps together on one worker
the tests that share a module fixture, and leaves the others free to go to any worker."""

import pytest


@pytest.fixture(scope="module")
def shared():
    return object()


def groups(node) -> list[str]:
    return [mark.args[0] for mark in node.iter_markers("xdist_group")]


def test_a_test_sharing_a_module_fixture_stays_with_its_file(request, shared):
    assert groups(request.node) == ["tests/unit/test_xdist_groups.py"]


def test_a_test_with_function_fixtures_only_goes_anywhere(request, tmp_path):
    assert groups(request.node) == []
