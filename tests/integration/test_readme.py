"""The README's every `sh` block runs as written, top to bottom, in one shell, on a fresh copy of the checkout.

The copy holds the tracked files (as this worktree has them now) under a path of at least 120 characters, so
that nothing may depend on the checkout's depth (unix socket paths hold at most 107 bytes), and is a git
repository of its own, so that what following the README leaves behind shows in `git status`. Its `.venv` is a
link to this venv (the Makefile then has nothing to install), and PYTHONPATH names the copy's sources, as the
Makefile's editable install would. A block is left out only when the line above its fence says
`<!-- readme-test: skip (why) -->`.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP = re.compile(r"<!-- readme-test: skip \((?P<why>[^)]+)\) -->")
FENCE = re.compile(r"^```(?P<info>\S*)\s*$")
COMMAND = re.compile(r"^ {4}(make|enclave|ansible-playbook|export|ENCLAVE_|AWS_)\b")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="local enclaves' namespaces and FUSE need root")


def shell_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, body, reason to skip or None) of each ```sh block, in order. The README may hold no
    other shell blocks (bash, shell, console, or indented commands), which would escape the test."""
    blocks, lines = [], text.splitlines()
    inside, start, info, body, previous = False, 0, "", [], ""
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if not inside and fence:
            inside, start, info, body = True, number, fence["info"], []
            skip = SKIP.fullmatch(previous.strip())
        elif inside and line.strip() == "```":
            inside = False
            if info == "sh":
                blocks.append((start, "\n".join(body), skip["why"] if skip else None))
            assert info not in ("bash", "shell", "console", "zsh"), f"README line {start}: use ```sh for commands"
        elif inside:
            body.append(line)
        else:
            assert not COMMAND.match(line), f"README line {number}: a command in an indented block, put it in ```sh"
            assert not SKIP.search(line) or FENCE.match(lines[number]), f"README line {number}: skip before no block"
        if line.strip():
            previous = line
    assert not inside, "README: a code block is never closed"
    return blocks


def readme_script(blocks: list[tuple[int, str, str | None]]) -> str:
    """One bash script of the blocks to run, in order: it stops at the first command that fails, naming its block."""
    script = ["set -euo pipefail", "set -x"]
    for line, body, why in blocks:
        if why is None:
            script += [f"trap 'echo \"README block of line {line} failed: $BASH_COMMAND\" >&2' ERR", body]
    return "\n".join([*script, "echo README-DONE"])


def test_the_readme_blocks_are_all_found():
    """The parser sees what the README holds: blocks to run, a few skipped with a reason, none hidden."""
    blocks = shell_blocks((ROOT / "README.md").read_text())
    run = [block[1] for block in blocks if block[2] is None]
    skipped = [block[2] for block in blocks if block[2] is not None]
    assert run[0].startswith("make demo") and len(run) >= 5
    assert len(skipped) <= 3 and all(len(why) > 20 for why in skipped)
    assert any("enclave local env" in body for body in run) and any("package seal" in body for body in run)
    # A command that fails stops the script there, naming the README line of its block.
    broken = shell_blocks("```sh\nX=1\n```\n\n```sh\ntest $X = 2\necho never\n```\n")
    done = subprocess.run(["bash", "-c", readme_script(broken)], capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "never" not in done.stdout and "README-DONE" not in done.stdout
    assert "README block of line 5 failed: test $X = 2" in done.stderr
    with pytest.raises(AssertionError, match="indented block"):
        shell_blocks("text\n\n    enclave local up\n")
    with pytest.raises(AssertionError, match="skip before no block"):
        shell_blocks("<!-- readme-test: skip (a reason that is long enough) -->\ntext\n")


def copy_checkout(destination: Path) -> None:
    """The tracked (and new, unignored) files of this worktree as they are now, committed in a fresh repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()  # fmt: skip
    for name in files:
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    git = ["git", "-c", "user.name=readme", "-c", "user.email=readme@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=destination, check=True)
    subprocess.run([*git, "add", "-A"], cwd=destination, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a fresh clone"], cwd=destination, check=True)
    # This venv stands in for the one `make` would build; pyproject.toml older than it, so make installs nothing.
    (destination / ".venv").symlink_to(sys.prefix)
    os.utime(destination / "pyproject.toml", (0, 0))


@needs_root
@pytest.mark.timeout(2400)  # the whole README, the SSH fleet's section included: beyond the default 600 s under load
def test_every_readme_block_runs_as_written_from_a_deep_checkout():
    work = Path(tempfile.mkdtemp(prefix="readme-", dir="/tmp"))
    checkout = work / "home-alice-src"
    while len(str(checkout / "confidential-ml-nitro")) < 120:
        checkout = checkout / "a-longer-directory"
    checkout = checkout / "confidential-ml-nitro"
    assert len(str(checkout)) >= 120
    checkout.mkdir(parents=True)
    copy_checkout(checkout)
    blocks = shell_blocks((checkout / "README.md").read_text())
    # A newcomer's environment: no AWS settings, no venv on PATH, this project's variables unset.
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(checkout / "collections"),
        "AWS_CONFIG_FILE": str(work / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "ANSIBLE_NOCOLOR": "1",
    }
    try:
        done = subprocess.run(["bash", "-c", readme_script(blocks)], cwd=checkout, env=env, capture_output=True,
                              text=True, timeout=2400, check=False)  # fmt: skip
        output = (
            f"exit {done.returncode}\n--- stdout (end)\n{done.stdout[-8000:]}\n--- stderr (end)\n{done.stderr[-8000:]}"
        )
        assert done.returncode == 0 and done.stdout.rstrip().endswith("README-DONE"), output
        # What the README's commands show: the demo's predictions, the session's metrics, verified receipts.
        assert done.stdout.count("receipt verified: ml_algorithm.py from digits-classifier 1.0.0 ran") == 3, output
        assert '"accuracy"' in done.stdout, output
        assert done.stdout.count(": sound\n") == 2, output
        # Everything stopped, nothing left for git outside build/.
        assert not any(os.path.ismount(p) for p in (checkout / "build" / "synced_folder",)), output
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=checkout,
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert status == "", status
        described = subprocess.run([str(checkout / ".venv" / "bin" / "enclave"), "local", "describe-enclaves"],
                                   env={**env, "ENCLAVE_HOME": str(checkout / "build" / "demo-home")},
                                   capture_output=True, text=True, check=True)  # fmt: skip
        assert described.stdout.strip() == "[]"
        assert not (checkout / "build" / "fleet" / "fleet.json").exists(), "the README left its SSH fleet running"
    finally:
        subprocess.run([str(checkout / ".venv" / "bin" / "python"), "tests/fixtures/ssh_fleet.py", "down"],
                       cwd=checkout, env=env, capture_output=True, timeout=300, check=False)  # fmt: skip
        home_env = {**env, "ENCLAVE_HOME": str(checkout / "build" / "demo-home")}
        subprocess.run(["fusermount3", "-u", "-z", str(checkout / "build" / "synced_folder")], capture_output=True,
                       check=False)  # fmt: skip
        subprocess.run([str(checkout / ".venv" / "bin" / "enclave"), "local", "down"], env=home_env,
                       capture_output=True, timeout=300, check=False)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
