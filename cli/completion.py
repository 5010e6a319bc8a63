"""`enclave completion bash|zsh`: a static completion script for the shell, generated from the CLI's own parser
by shtab (an optional extra: pip install 'confidential-ml-nitro[completion]').

    enclave completion bash > ~/.local/share/bash-completion/completions/enclave
    enclave completion zsh > ~/.zfunc/_enclave      # with fpath+=~/.zfunc before compinit
"""

import argparse

from ..plugins.module_utils.errors import EnclaveError

SHELLS = ("bash", "zsh")
# Arguments that name files or folders on this host (not in the share): the shell completes them as paths.
# shtab's FILE and DIRECTORY, spelled out so that building the parser never needs shtab.
FILE = {"bash": "_shtab_compgen_files", "zsh": "_files"}
DIRECTORY = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"}
HOST_PATHS = {
    "file": FILE,
    "output": FILE,
    "receipt": FILE,
    "release": FILE,
    "existing": FILE,
    "root": FILE,
    "trust_root": FILE,
    "eif_path": FILE,
    "owner_identity": FILE,
    "dir": DIRECTORY,
    "state": DIRECTORY,
    "outputs": DIRECTORY,
    "local_dir": DIRECTORY,
}


def _mark_paths(parser: argparse.ArgumentParser, top: bool = True) -> None:
    for action in parser._actions:  # argparse keeps subcommands there and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _mark_paths(sub, top=False)
        elif action.dest in HOST_PATHS and not (action.dest == "file" and parser.prog.endswith(" run")):
            # shtab reads `complete` off the action; run -f names a package in the share, not a host file
            action.complete = HOST_PATHS[action.dest]  # type: ignore[attr-defined]


def cmd_completion(args, build_parser) -> int:
    try:
        import shtab
    except ImportError:
        raise EnclaveError(
            "shell completion needs shtab, an optional extra: pip install 'confidential-ml-nitro[completion]' "
            "(or pip install shtab), then run this again"
        ) from None
    parser = build_parser()
    _mark_paths(parser)
    print(shtab.complete(parser, shell=args.shell))
    return 0


def register(commands, build_parser) -> None:
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    completion.set_defaults(func=lambda args: cmd_completion(args, build_parser))
