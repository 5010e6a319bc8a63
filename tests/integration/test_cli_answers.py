"""A newcomer's first hour with the `enclave` CLI against a real served enclave: every mistake gets a plain
answer (issue 12). --json prints one JSON document, Ctrl-C ends with one line, and a missing package or share
path is named with what exists and what to do, in the user's words rather than the protocol's."""

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from ansible_collections.confidential_ml.nitro.cli import main
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import ENCLAVE, cli


def push_app(enclave):
    cli("push", str(enclave["sealed"].parent), "/encrypted", "--expect-pcr0", enclave["pcr0"])


def test_run_json_prints_exactly_one_json_document(enclave, tmp_path):
    push_app(enclave)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("hi")
    cli("push", str(data), "/dataset", "--expect-pcr0", enclave["pcr0"])
    run = cli("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset -o /output",
              "--expect-pcr0", enclave["pcr0"], "--json")  # fmt: skip
    summary = json.loads(run.stdout)  # the whole of stdout, nothing before or after
    assert summary["rc"] == 0 and summary["ended_by"] == "exit"
    assert "classified a.txt short" in run.stderr and "done" in run.stderr  # the script's output, on stderr


def test_ctrl_c_in_run_cancels_the_job_with_one_line(enclave):
    push_app(enclave)
    proc = subprocess.Popen([*ENCLAVE, "run", "-f", "app.pkg", "-s", "spin.py", "--expect-pcr0", enclave["pcr0"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline() == "spinning\n"  # the job is running in the enclave
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "interrupted" in stderr and "cancelled" in stderr
    deadline = time.time() + 30
    with EnclaveClient(enclave["endpoint"]) as client:  # the enclave goes idle: the job is gone
        while client.call("health")["job"] is not None:
            assert time.time() < deadline, "the job outlived the interrupted CLI"
            time.sleep(0.05)
    again = cli("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset -o /output",
                "--expect-pcr0", enclave["pcr0"], "--clear-output")  # fmt: skip
    assert again.returncode == 0


def test_missing_package_names_the_packages_there(enclave):
    push_app(enclave)
    result = cli("run", "-f", "digits.pkg", "-s", "x.py", "--expect-pcr0", enclave["pcr0"], check=False)
    assert result.returncode == 1
    err = result.stderr
    assert "/encrypted/digits.pkg" in err and "app.pkg" in err and "enclave push" in err, err
    assert "job.run" not in err and "ENOENT" not in err, err
    # Any other error of the server reads as its message alone, too.
    result = cli("run", "-f", "app.pkg", "-s", "nope.py", "--expect-pcr0", enclave["pcr0"], check=False)
    assert result.returncode == 1 and "enclave: error: script 'nope.py' is not in package" in result.stderr
    assert "job.run" not in result.stderr and "ENOENT" not in result.stderr
    # -v, after the subcommand too, logs the protocol's words for whoever debugs it.
    result = cli("run", "-f", "app.pkg", "-s", "nope.py", "--expect-pcr0", enclave["pcr0"], "-v", check=False)
    assert "DEBUG the enclave server answered job.run:" in result.stderr and "(ENOENT)" in result.stderr


def test_pull_of_a_missing_folder_names_the_share_folders(enclave, tmp_path):
    result = cli("pull", "/nonexistent", str(tmp_path / "out"), "--expect-pcr0", enclave["pcr0"], check=False)
    assert result.returncode == 1
    err = result.stderr
    assert "/nonexistent" in err and all(f"/{top}" in err for top in ("dataset", "model", "output", "encrypted"))
    assert "share.manifest" not in err and "ENOENT" not in err, err
    assert not (tmp_path / "out").exists()


def test_push_creates_missing_folders_inside_the_share(enclave, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("hi")
    pushed = json.loads(cli("push", str(data), "/dataset/sub/deeper", "--expect-pcr0", enclave["pcr0"],
                            "--json").stdout)  # fmt: skip
    assert pushed["changed"] == ["a.txt"]
    assert (enclave["share"] / "dataset" / "sub" / "deeper" / "a.txt").read_text() == "hi"
    again = json.loads(cli("push", str(data), "/dataset/sub/deeper", "--expect-pcr0", enclave["pcr0"],
                           "--json").stdout)  # fmt: skip
    assert again["changed"] == [] and again["unchanged"] == 1
    # A dry run creates nothing, and says what it would push.
    dry = cli("push", str(data), "/model/new", "--dry-run", "--expect-pcr0", enclave["pcr0"])
    assert "would push a.txt" in dry.stdout and not (enclave["share"] / "model" / "new").exists()


def test_push_outside_the_share_folders_says_where_it_may_go(enclave, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("hi")
    result = cli("push", str(data), "/datasets/x", "--expect-pcr0", enclave["pcr0"], check=False)
    assert result.returncode == 1
    err = result.stderr
    assert "/datasets" in err and all(f"/{top}" in err for top in ("dataset", "model", "output", "encrypted"))
    assert "share.manifest" not in err and "ENOENT" not in err, err
    assert not (enclave["share"] / "datasets").exists()


def test_version_and_verbose_after_the_subcommand():
    galaxy = yaml.safe_load((Path(main.__file__).parent.parent / "galaxy.yml").read_text())["version"]
    try:
        installed = metadata.version("confidential-ml-nitro")
    except metadata.PackageNotFoundError:
        installed = galaxy
    assert cli("--version").stdout == f"enclave {installed}\n"
    result = cli("package", "inspect", "/nonexistent.pkg", "-v", check=False)
    assert result.returncode == 1 and "unrecognized arguments" not in result.stderr
    assert "/nonexistent.pkg" in result.stderr


def test_version_falls_back_to_galaxy_yml(monkeypatch):
    """Run from a checkout or an installed collection (no distribution): galaxy.yml's version."""

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    galaxy = yaml.safe_load((Path(main.__file__).parent.parent / "galaxy.yml").read_text())["version"]
    assert main.version() == str(galaxy)


# Every error a user can cause: one line naming the path or value, what is allowed and what to do, without the
# protocol's operation names, errno symbols or Python's "[Errno N]".
JARGON = re.compile(r"\(E[A-Z]+\)|\[Errno|\b(share|job)\.[a-z]+\b|Traceback|\bNone\b")
USER_ERRORS = {
    "run of a package that is not there": (
        lambda e, t: ["run", "-f", "missing.pkg", "-s", "x.py", "--expect-pcr0", e["pcr0"]],
        ["/encrypted/missing.pkg", "/encrypted/app.pkg", "`enclave push DIR /encrypted`"],
    ),
    "run of a package outside /encrypted": (
        lambda e, t: ["run", "-f", "/dataset/app.pkg", "-s", "x.py", "--expect-pcr0", e["pcr0"]],
        ["'/dataset/app.pkg'", "must be a file under /encrypted"],
    ),
    "push of a folder that is not there": (
        lambda e, t: ["push", str(t / "nope"), "/dataset", "--expect-pcr0", e["pcr0"]],
        ["/nope is not a directory", "push copies a directory's contents"],
    ),
    "push outside the share's folders": (
        lambda e, t: ["push", str(t), "/datasets/sub", "--expect-pcr0", e["pcr0"]],
        ["/datasets/sub", "/dataset, /encrypted, /model, /output", "push into one of them"],
    ),
    "pull of a folder that is not there": (
        lambda e, t: ["pull", "/nonexistent", str(t / "out"), "--expect-pcr0", e["pcr0"]],
        ["/nonexistent is not a folder", "/dataset, /encrypted, /model, /output", "`enclave pull /output DIR`"],
    ),
    "pull of a file": (
        lambda e, t: ["pull", "/encrypted/app.pkg", str(t / "out"), "--expect-pcr0", e["pcr0"]],
        ["/encrypted/app.pkg is not a folder", "/encrypted holds /encrypted/app.pkg", "pull a folder"],
    ),
    "inspect of a file that is not a package": (
        lambda e, t: ["package", "inspect", str(e["tmp"] / "app" / "model.py")],
        ["/app/model.py is not a readable package", "obtain a fresh copy from the owner"],
    ),
    "inspect of a folder": (
        lambda e, t: ["package", "inspect", str(e["tmp"] / "app")],
        ["/app is a folder", "give the path of a package file"],
    ),
    "inspect of a file that is not there": (
        lambda e, t: ["package", "inspect", str(t / "app.pkg")],
        ["/app.pkg is not there", "give the path of a package file"],
    ),
    "an endpoint without a scheme": (
        lambda e, t: ["attest", "--endpoint", "localhost:5000"],
        ["'localhost:5000'", "vsock://CID:PORT or unix:///path.sock"],
    ),
    "share ls of a path that is not there": (
        lambda e, t: ["share", "ls", "/dataset/nope"],
        ["no /dataset/nope", "/dataset is empty", "`enclave share ls /dataset`"],
    ),
}


@pytest.mark.parametrize("case", USER_ERRORS)
def test_a_users_mistake_gets_one_plain_line(enclave, tmp_path, case):
    push_app(enclave)
    argv, expected = USER_ERRORS[case]
    result = cli(*argv(enclave, tmp_path), check=False)
    err = result.stderr
    assert result.returncode == 1 and err.startswith("enclave: error: ") and len(err.splitlines()) == 1, err
    assert not JARGON.search(err), err
    for fragment in expected:
        assert fragment in err, (fragment, err)


def _parsers(parser, path=("enclave",)):
    """Every (sub)command's parser with its command line, and the help each subcommand has in its parent."""
    yield path, parser
    for action in parser._actions:  # argparse keeps subcommands there and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"`{' '.join(path)} {name}` has no help in `{' '.join(path)} --help`"
                yield from _parsers(sub, (*path, name))


def test_every_command_and_flag_has_help():
    missing = [
        f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
        for path, parser in _parsers(main.build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert not missing, f"options without help: {missing}"


def complete(script: str, *words: str) -> list[str]:
    """What bash offers after `enclave WORDS...` (the last word being typed) with the generated script loaded."""
    line = " ".join(("enclave", *words))
    driver = (
        f'source "$1"\nCOMP_WORDS=(enclave {" ".join(shlex.quote(w) for w in words)})\n'
        f"COMP_CWORD={len(words)}\nCOMP_LINE={shlex.quote(line)}\nCOMP_POINT=${{#COMP_LINE}}\n"
        '_shtab_enclave\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(["bash", "-c", driver, "bash", script], capture_output=True, text=True, check=True)
    return sorted(filter(None, done.stdout.splitlines()))


def test_bash_completion_from_the_parser(tmp_path):
    pytest.importorskip("shtab", reason="shtab is the optional completion extra (the test extra installs it)")
    script = tmp_path / "enclave.bash"
    script.write_text(cli("completion", "bash").stdout)
    commands = complete(str(script), "")
    assert {"attest", "completion", "job", "pull", "push", "run", "share", "status", "sync"} <= set(commands)
    assert complete(str(script), "sh") == ["share"]
    assert complete(str(script), "share", "") == ["ls", "rm"]
    assert complete(str(script), "job", "c") == ["cancel"]
    assert complete(str(script), "push", "--dry") == ["--dry-run"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data.txt").write_text("")
    assert complete(str(script), "push", f"{tmp_path}/da") == [f"{tmp_path}/data"]  # a host folder: folders only
    assert cli("completion", "zsh").stdout.startswith("#compdef enclave")


def test_completion_without_shtab_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "shtab", None)  # import shtab raises ImportError
    assert main.main(["completion", "bash"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'confidential-ml-nitro[completion]'" in err and "Traceback" not in err
