"""`enclave run`, `push` and `pull` parse with a parser holding that command alone (building all of them costs
their start ~10 ms); it must answer exactly as the whole parser does: the same values, help and errors."""

import contextlib
import io

import pytest

from ansible_collections.confidential_ml.nitro.cli import main

RUN = ["run", "-f", "app.pkg", "-s", "ml.py", "-a", "-d /dataset", "--expect-pcr0", "ab" * 48, "--timeout", "5"]


def answer(parser, argv):
    """(parsed values or exit status, stdout, stderr) of parser on argv."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = vars(parser.parse_args(argv))
        except SystemExit as exit_:
            result = exit_.code
    return result, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv",
    [
        RUN,
        ["-v", *RUN],
        [*RUN, "-v", "--json", "--clear-output", "--receipt", "r.json"],
        ["run", "--help"],
        ["--verbose", "run", "-h"],
        ["run", "-f", "app.pkg"],  # -s missing
        ["run", "-f", "app.pkg", "-s", "ml.py", "--timeout", "soon"],
        ["run", "-f", "app.pkg", "-s", "ml.py", "--no-such-flag"],
        ["push", "data", "/dataset", "--expect-pcr0", "ab" * 48, "--dry-run"],
        ["-v", "pull", "/output", "out", "--no-attestation", "--json", "-v"],
        ["push", "--help"],
        ["pull", "/output"],  # local_dir missing
        ["push", "a", "b", "--no-such-flag"],
    ],
)
def test_a_command_alone_answers_as_the_whole_parser(argv):
    assert len(main._parser(argv)._subparsers._group_actions[0].choices) == 1  # the command alone was built
    assert answer(main._parser(argv), argv) == answer(main.build_parser(), argv)


@pytest.mark.parametrize("argv", [[], ["-v"], ["--version", "run"], ["share", "ls"], ["pushes"], ["runs"], ["-h"]])
def test_anything_else_gets_the_whole_parser(argv):
    assert len(main._parser(argv)._subparsers._group_actions[0].choices) == len(
        main.build_parser()._subparsers._group_actions[0].choices
    )
