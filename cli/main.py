"""The `enclave` command: a thin shell over the shared library.

Each subcommand parses its flags, calls one library function and prints the
result (human text, or JSON with --json). Imports are deferred to the
subcommand that needs them so that `enclave --help` and job start stay fast.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from ..plugins.module_utils.errors import EnclaveError
from . import options

LIB = "ansible_collections.confidential_ml.nitro.plugins.module_utils"


# What Ctrl-C left behind, per command (the connection is closed on the way out: the enclave stops the job).
INTERRUPTED = {
    "run": "the job was cancelled in the enclave; run it again when you are ready",
    "push": "the push was cancelled partway; push again to copy the rest (unchanged files are skipped)",
    "pull": "the pull was cancelled partway; pull again to copy the rest (unchanged files are skipped)",
}


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _parse_context(pairs) -> dict:
    context = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EnclaveError(f"--context {pair!r} is not KEY=VALUE")
        context[key] = value
    return context


def _read_text(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text()


# ---------------------------------------------------------------- package


def cmd_package_seal(args) -> int:
    from importlib import import_module

    package = import_module(f"{LIB}.package_seal")
    src = Path(args.dir)
    kms = options.kms_client(args)
    signer = import_module(f"{LIB}.owner_identity").KmsSigner(kms, args.signing_key) if args.signing_key else None
    name = args.name or src.resolve().name
    context = _parse_context(args.context)
    # Idempotent, as the enclave_package module: an up-to-date package is left alone (--force seals it again).
    check = package.needs_seal(
        src,
        args.output,
        key_id=args.key,
        name=name,
        version=args.version,
        encryption_context=context,
        signer=signer,
        kms=lambda: kms,
        force=args.force,
    )
    if not check.needed:
        if args.json:
            _print_json({"path": args.output, "changed": False, **check.before})
        else:
            print(
                f"{args.output} is up to date: package {name!r} {args.version} of {src} under key "
                f"{check.before['key_id']}; nothing sealed (--force seals it again with a fresh data key)"
            )
        return 0
    header = package.seal(
        src,
        Path(args.output),
        kms_client=kms,
        signer=signer,
        key_id=args.key,
        name=name,
        version=args.version,
        encryption_context=context,
        progress=not args.json and sys.stderr.isatty(),
    )
    if args.json:
        _print_json({"path": args.output, "changed": True, **header.to_json()})
    else:
        signed = f", signed by {header.signer_key_id}" if signer else ", UNSIGNED: only unbound images run it"
        print(f"sealed {src} -> {args.output}: package {header.name!r} {header.version}, key {header.key_id}{signed}")
    return 0


def cmd_package_inspect(args) -> int:
    from importlib import import_module

    path = Path(args.file)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not there" if not path.exists() else "not a regular file"
        raise EnclaveError(f"{path} is {what}: give the path of a package file (the .pkg the owner published)")
    header = import_module(f"{LIB}.package_format").read_header(path)
    data = header.to_json()
    if args.json:
        _print_json(data)
        return 0
    # One "key: value" line per header field, as --json names them; nothing printed as a Python dict.
    data["encryption_context"] = ", ".join(f"{k}={v}" for k, v in sorted(data["encryption_context"].items()))
    data["encryption_context"] = data["encryption_context"] or "none"
    data["wrapped_key"] = f"{len(header.wrapped_key)} bytes (the data key under the KMS key; base64 in --json)"
    signer = data.pop("signer", None)
    for key in sorted(data):
        print(f"{key}: {data[key]}")
    if signer is None:
        print("signer: none (format 1, unsigned: an image bound to its owner refuses it)")
    else:  # as the header claims it: the enclave checks the signature against the keys its image carries
        print(f"signer: {signer['key_id']} (public key SHA-256 {signer['fingerprint']})")
    return 0


# ---------------------------------------------------------------- kms


def cmd_kms_serve(args) -> int:
    from importlib import import_module

    from cryptography import x509

    settings = import_module(f"{LIB}.settings")
    attestation = import_module(f"{LIB}.attestation")
    kms = import_module("ansible_collections.confidential_ml.nitro.enclave_local.kms")
    nsm_sim = import_module("ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim")

    home = settings.state_home()
    state = Path(args.state) if args.state else home / "kms"
    if args.trust_root:
        roots = [x509.load_pem_x509_certificate(Path(p).read_bytes()) for p in args.trust_root]
    else:
        # The local backend's enclaves attest with the local CA; real Nitro enclaves with AWS's root.
        roots = [attestation.aws_nitro_root(), nsm_sim.LocalCA.load_or_create(home).root_certificate]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = kms.LocalKmsServer(kms.LocalKms(state, trusted_roots=roots), host=args.host, port=args.port)
    credentials = server.kms.credentials_file
    print(f"local KMS listening on {server.endpoint_url} (state {state}, credentials {credentials})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


# ---------------------------------------------------------------- attestation


def cmd_attestation_verify(args) -> int:
    from importlib import import_module

    attestation = import_module(f"{LIB}.attestation")
    roots = attestation.load_trusted_roots(args.root or (), include_aws=not args.root or args.include_aws)
    expected = {0: args.expect_pcr0} if args.expect_pcr0 else None
    doc = attestation.verify_document(
        Path(args.file).read_bytes(),
        trusted_roots=roots,
        expected_pcrs=expected,
        nonce=bytes.fromhex(args.nonce) if args.nonce else None,
        max_age_s=args.max_age,
        allow_debug=args.allow_debug,
    )
    if args.json:
        _print_json(doc.to_json())
    else:
        print(f"attestation document verified: module {doc.module_id}, PCR0 {doc.pcr_hex(0)}")
    return 0


# ---------------------------------------------------------------- policy


def cmd_policy_render(args) -> int:
    from importlib import import_module

    key_policy = import_module(f"{LIB}.key_policy")
    existing = json.loads(_read_text(args.existing)) if args.existing else None
    policy = key_policy.render_policy(
        account_id=args.account_id,
        user_principals=args.user_principal,
        pcr0=args.pcr0,
        pcr8=args.pcr8 or (),
        admin_principals=args.admin_principal or None,
        existing=existing,
    )
    text = json.dumps(policy, indent=2, sort_keys=True) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_policy_apply(args) -> int:
    """What the enclave_key_policy module does, from the shell: the same decision (rotation window, lint before
    writing), written to KMS only when it changes the policy; --check writes nothing."""
    from importlib import import_module

    update = import_module(f"{LIB}.key_policy_update")
    if not args.absent:
        given = {"--account-id": args.account_id, "--user-principal": args.user_principal}
        missing = [flag for flag, value in {**given, "--admin-principal": args.admin_principal}.items() if not value]
        if missing:
            raise EnclaveError(f"policy apply needs {', '.join(missing)} (or --absent to take our statements out)")
    wanted = update.OwnerKeyPolicy(
        state="absent" if args.absent else "present",
        account_id=args.account_id,
        user_principals=args.user_principal or (),
        admin_principals=args.admin_principal,
        pcr0=args.pcr0 or (),
        pcr8=args.pcr8 or (),
        keep_newest=args.keep_newest,
    )
    names = {
        "key_id": "KEY_ID",
        "region": "--region",
        "kms_endpoint_url": "--kms-endpoint",
        "admin_principals": "--admin-principal",
    }
    change = update.apply_key_policy(options.kms_client(args), args.key_id, wanted, check_mode=args.check, names=names)
    for warning in change.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        result = {"changed": change.changed, "key_arn": change.key_arn, "policy": change.after}
        _print_json({**result, "allowed_pcr0": change.allowed_pcr0})
    else:
        if args.diff and change.changed:
            import difflib

            diff = change.diff()
            before, after = diff["before"].splitlines(True), diff["after"].splitlines(True)
            sys.stdout.writelines(difflib.unified_diff(before, after, "before", "after"))
        verb = ("would change" if args.check else "changed") if change.changed else "unchanged"
        print(f"key policy of {change.key_arn} {verb}; allowed PCR0: {', '.join(change.allowed_pcr0) or 'none'}")
    return 0


def cmd_policy_lint(args) -> int:
    from importlib import import_module

    policy_lint = import_module(f"{LIB}.policy_lint")
    if args.signing_key:  # the owner's package-signing key: only the owner may kms:Sign
        if not args.owner_principal:
            raise EnclaveError("--signing-key needs --owner-principal ARN (each role of the owner that signs)")
        problems = policy_lint.lint_signing_policy(_read_text(args.file), owner_principals=args.owner_principal)
    else:
        problems = policy_lint.lint(_read_text(args.file), user_principals=args.user_principal or ())
    if args.json:
        _print_json({"sound": not problems, "problems": problems})
    elif problems:
        for problem in problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
    else:
        print(f"{args.file}: sound")
    return 1 if problems else 0


# ---------------------------------------------------------------- enclave client


def expected_pcr0(args, *, required: bool = True) -> list | None:
    """The PCR0 values the enclave must attest (--expect-pcr0, else --release's image), or None with
    --no-attestation; an error when none of the three is given and required (a command that sends data)."""
    from importlib import import_module

    client = import_module(f"{LIB}.client")
    if not required and args.expect_pcr0 is None and args.release is None:
        return None
    return client.expected_pcr0(args.expect_pcr0, args.release, getattr(args, "no_attestation", False))


def _client(args, *, attest_first: bool = True):
    from importlib import import_module

    client = import_module(f"{LIB}.client")
    expect = expected_pcr0(args) if attest_first else None
    endpoint = args.endpoint  # given: neither the runtimes nor `enclave local` are imported (~3 ms of a start)
    if not endpoint:
        from . import local as local_cmd

        runtime = import_module(f"{LIB}.runtime")
        endpoint = runtime.resolve_endpoint(cid=args.cid, port=args.port, local_runtime=local_cmd.runtime)
    return client.EnclaveClient(endpoint, expect_pcr0=expect, allow_debug=args.allow_debug)


def _add_enclave_flags(parser, *, attest: bool = True) -> None:
    group = parser.add_argument_group("enclave")
    group.add_argument(
        "--endpoint", help="vsock://CID:PORT or unix:///PATH (default: $ENCLAVE_ENDPOINT, --cid, discovery)"
    )
    group.add_argument("--cid", type=int, help="enclave CID (nitro)")
    group.add_argument("--port", type=int, help="enclave server port (default 5000)")
    group.add_argument("--expect-pcr0", metavar="HEX", help="send nothing unless the enclave attests this PCR0")
    group.add_argument(
        "--release", metavar="FILE", help="the owner's release.json: send nothing unless the enclave attests its image"
    )
    if attest:
        group.add_argument(
            "--no-attestation",
            action="store_true",
            help="send data without checking the enclave's image (needed when neither of the above is given)",
        )
    group.add_argument("--allow-debug", action="store_true", help="accept debug-mode (all-zero PCR) enclaves")


def cmd_attest(args) -> int:
    expect = expected_pcr0(args, required=False)  # nothing is sent: checking the signature alone is fine here
    with _client(args, attest_first=False) as client:
        doc = client.attest(nonce=bytes.fromhex(args.nonce) if args.nonce else None, expect_pcr0=expect)
    if args.json:
        _print_json(doc.to_json())
    else:
        print(f"enclave attested: module {doc.module_id}, PCR0 {doc.pcr_hex(0)}")
    return 0


def _report_transfer(args, verb: str, result: dict) -> None:
    """One summary line (a dry run lists what would change first: that is what it is for)."""
    if args.json:
        _print_json(result)
        return
    if args.dry_run:
        for path in result["changed"]:
            print(f"{verb} {path}")
    from importlib import import_module

    size = import_module(f"{LIB}.client").human_size(result["bytes"])
    print(f"{verb} {len(result['changed'])} changed files or folders ({size}), skipped "
          f"{result['unchanged']} unchanged, in {result['seconds']:.2f} s")  # fmt: skip


def cmd_push(args) -> int:
    progress = not args.json and sys.stderr.isatty()
    with _client(args) as client:
        result = client.push(args.local_dir, args.remote_dir, dry_run=args.dry_run, progress=progress)
    _report_transfer(args, "would push" if args.dry_run else "pushed", result)
    return 0


def cmd_pull(args) -> int:
    progress = not args.json and sys.stderr.isatty()
    with _client(args) as client:
        result = client.pull(args.remote_dir, args.local_dir, dry_run=args.dry_run, progress=progress)
    _report_transfer(args, "would pull" if args.dry_run else "pulled", result)
    return 0


def cmd_run(args) -> int:
    from importlib import import_module

    client_lib = import_module(f"{LIB}.client")
    kms = client_lib.host_kms_settings(region=args.region, profile=args.profile)
    # With --json stdout holds the summary alone, so the script's own output streams to stderr.
    streams = {"stdout": sys.stderr.buffer if args.json else sys.stdout.buffer, "stderr": sys.stderr.buffer}

    def on_output(name: str, data: bytes) -> None:
        streams[name].write(data)
        streams[name].flush()

    with _client(args) as client:
        summary = client.run(
            args.file,
            args.script,
            args.args or "",
            kms=kms,
            on_output=on_output,
            timeout=args.timeout,
            clear_output=args.clear_output,
        )
    if args.receipt:
        # Checked as enclave_run checks it before it is saved: a receipt that does not verify proves nothing.
        roots = client.trusted_roots if client.trusted_roots is not None else client_lib.default_trusted_roots()
        receipt = import_module(f"{LIB}.receipt")
        verified = receipt.verify_job_receipt(
            summary, trusted_roots=roots, attested=client.attested, allow_debug=args.allow_debug
        )
        verified.receipt.save(args.receipt)
    if args.json:
        summary = dict(summary, attestation=summary["attestation"].hex())
        _print_json(summary)
    else:
        for out in summary["outputs"]:
            print(f"output {out['path']} {out['size']} bytes sha256 {out['sha256']}", file=sys.stderr)
        if summary["ended_by"] == "cancelled":  # this client did not cancel it: Ctrl-C never gets here
            print(f"enclave: job {summary['job']} was cancelled from elsewhere (enclave job cancel); what it wrote "
                  "so far is in /output", file=sys.stderr)  # fmt: skip
        elif summary["ended_by"] != "exit":
            print(f"enclave: job {summary['job']} ended by {summary['ended_by']}", file=sys.stderr)
    return summary["rc"] if 0 <= summary["rc"] < 256 else 128 + abs(summary["rc"])


def cmd_receipt_verify(args) -> int:
    from importlib import import_module

    receipt = import_module(f"{LIB}.receipt")
    client = import_module(f"{LIB}.client")
    attestation = import_module(f"{LIB}.attestation")
    roots = attestation.load_trusted_roots(args.root) if args.root else client.default_trusted_roots()
    proof = receipt.verify_receipt(
        receipt.Receipt.load(args.file),
        release=receipt.Release.load(args.release),
        trusted_roots=roots,
        outputs_dir=args.outputs,
        allow_debug=args.allow_debug,
    ).to_dict()
    if args.json:
        _print_json(proof)
    else:
        print(
            f"receipt verified: {proof['script']} from {proof['package']} ran in an enclave with PCR0 {proof['pcr0']}"
        )
        print(f"  arguments {proof['args']}, exit status {proof['rc']}, {proof['inputs']} input files")
        for path in proof["outputs_checked"]:
            print(f"  output matches: {path}")
    return 0


# ---------------------------------------------------------------- parser


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `enclave` parser without its commands, and the action that holds them."""
    parser = argparse.ArgumentParser(
        prog="enclave", description="Confidential ML in AWS Nitro Enclaves (and the local embedded backend)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output (also after the command)")
    parser.add_argument("--version", action=_PrintVersion)
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def _add_run(commands) -> None:
    run = commands.add_parser("run", help="run a script from an encrypted package in the enclave")
    run.add_argument("-f", "--file", required=True, help="package in the share's /encrypted (name or /encrypted/NAME)")
    run.add_argument("-s", "--script", required=True, help="the .py file inside the package to run")
    run.add_argument("-a", "--args", help="the script's arguments, split as a shell would")
    run.add_argument("--timeout", type=float, help="seconds before the job is killed")
    run.add_argument(
        "--clear-output",
        action="store_true",
        help="remove what is left in /output first (a job starts only on an empty /output: pull it before)",
    )
    run.add_argument("--region", help="AWS region of the package's KMS key")
    run.add_argument("--profile", help="AWS profile whose credentials travel with the job")
    run.add_argument(
        "--json",
        action="store_true",
        help="print the job summary as one JSON document on stdout (the script's stdout then goes to stderr)",
    )
    run.add_argument("--receipt", metavar="FILE", help="save the job's signed receipt (see `enclave receipt verify`)")
    _add_enclave_flags(run)
    run.set_defaults(func=cmd_run)


def _add_transfer(commands, name: str) -> None:
    """`push` or `pull`."""
    func, first, second, helptext = {
        "push": (cmd_push, "local_dir", "remote_dir", "copy a local directory into the share (changed files only)"),
        "pull": (cmd_pull, "remote_dir", "local_dir", "copy a share directory to the host (changed files only)"),
    }[name]
    transfer = commands.add_parser(name, help=helptext)
    where = {"local_dir": "folder on this host", "remote_dir": "folder in the enclave's share, e.g. /dataset"}
    transfer.add_argument(first, help=f"the {where[first]} to copy from")
    transfer.add_argument(second, help=f"the {where[second]} to copy into (created if missing)")
    transfer.add_argument("--dry-run", action="store_true", help="only list what would change")
    transfer.add_argument("--json", action="store_true", help="print what changed as one JSON document")
    _add_enclave_flags(transfer)
    transfer.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser, commands = _top_parser()

    package = commands.add_parser("package", help="seal and inspect encrypted application packages")
    package_cmds = package.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    seal = package_cmds.add_parser("seal", help="seal a directory into an encrypted package")
    seal.add_argument("dir", help="directory to seal")
    seal.add_argument("-o", "--output", required=True, help="package file to write")
    seal.add_argument("--key", required=True, help="KMS key id, ARN or alias")
    seal.add_argument(
        "--signing-key",
        metavar="KEY",
        help="the owner's KMS signing key (ECC_NIST_P384, SIGN_VERIFY) that signs the header; images bound to "
        "the owner run only packages it signed (without it: an unsigned format-1 package)",
    )
    seal.add_argument("--name", help="package name (default: the directory's name)")
    seal.add_argument("--version", default="0.0.0", help="package version (default 0.0.0)")
    seal.add_argument("--context", action="append", metavar="KEY=VALUE", help="extra KMS encryption context")
    seal.add_argument(
        "--force",
        action="store_true",
        help="seal even when the output already is this directory's package as it is now (a fresh data key), or "
        "when the output is a file that is not a package",
    )
    seal.add_argument("--json", action="store_true", help="print the header as JSON, with changed: true or false")
    options.add_kms_flags(seal)
    seal.set_defaults(func=cmd_package_seal)
    inspect = package_cmds.add_parser("inspect", help="print a package's header (needs no key)")
    inspect.add_argument("file", help="the package file (.pkg)")
    inspect.add_argument("--json", action="store_true", help="print the header as JSON (the wrapped key in base64)")
    inspect.set_defaults(func=cmd_package_inspect)

    kms = commands.add_parser("kms", help="the local KMS (the embedded stand-in for AWS KMS)")
    kms_cmds = kms.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    serve = kms_cmds.add_parser("serve", help="serve the KMS JSON protocol on loopback")
    serve.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    serve.add_argument("--state", help="state directory (default: $ENCLAVE_HOME/kms)")
    serve.add_argument(
        "--trust-root", action="append", metavar="PEM", help="attestation roots to trust (default: AWS Nitro, local CA)"
    )
    serve.set_defaults(func=cmd_kms_serve)

    att = commands.add_parser("attestation", help="verify attestation documents")
    att_cmds = att.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    verify = att_cmds.add_parser("verify", help="verify a COSE_Sign1 attestation document")
    verify.add_argument("file", help="the attestation document (COSE_Sign1, CBOR)")
    verify.add_argument("--expect-pcr0", metavar="HEX", help="required PCR0 (the image measurement)")
    verify.add_argument("--nonce", metavar="HEX", help="required nonce")
    verify.add_argument("--root", action="append", metavar="PEM", help="trusted root(s) (default: AWS Nitro root G1)")
    verify.add_argument("--include-aws", action="store_true", help="trust the AWS Nitro root as well as --root")
    verify.add_argument("--max-age", type=float, default=None, metavar="SECONDS", help="refuse older documents")
    verify.add_argument("--allow-debug", action="store_true", help="accept all-zero PCRs (debug-mode enclaves)")
    verify.add_argument("--json", action="store_true", help="print the verified document as JSON")
    verify.set_defaults(func=cmd_attestation_verify)

    policy = commands.add_parser("policy", help="render, lint and apply KMS key policies")
    policy_cmds = policy.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    render = policy_cmds.add_parser("render", help="render the owner's key policy for the allowed measurements")
    render.add_argument("--pcr0", action="append", required=True, metavar="HEX", help="allowed PCR0 (repeatable)")
    render.add_argument("--pcr8", action="append", metavar="HEX", help="required PCR8, the signing certificate")
    render.add_argument("--account-id", required=True, help="the owner's AWS account id")
    render.add_argument(
        "--user-principal", action="append", required=True, metavar="ARN", help="principal of the enclave's host"
    )
    render.add_argument(
        "--admin-principal", action="append", required=True, metavar="ARN", help="the owner's roles (administer)"
    )
    render.add_argument("--existing", metavar="FILE", help="existing policy to merge into ('-' for stdin)")
    render.add_argument("-o", "--output", help="write to FILE instead of stdout")
    render.set_defaults(func=cmd_policy_render)
    apply = policy_cmds.add_parser(
        "apply", help="write the enclave statements into a KMS key's policy, as the enclave_key_policy module does"
    )
    apply.add_argument("key_id", metavar="KEY_ID", help="the KMS key: key id, key ARN, alias/NAME or alias ARN")
    apply.add_argument("--pcr0", action="append", metavar="HEX", help="PCR0 to allow, newest first (repeatable)")
    apply.add_argument("--keep-newest", type=int, metavar="N", help="keep only the N newest allowed PCR0 values")
    apply.add_argument("--pcr8", action="append", metavar="HEX", help="required PCR8 (replaces the current ones)")
    apply.add_argument("--account-id", help="the owner's AWS account id")
    apply.add_argument("--user-principal", action="append", metavar="ARN", help="principal of the enclave's host")
    apply.add_argument("--admin-principal", action="append", metavar="ARN", help="the owner's roles (administer)")
    apply.add_argument("--absent", action="store_true", help="take the enclave statements out instead")
    apply.add_argument("--check", action="store_true", help="only report whether the policy would change")
    apply.add_argument("--diff", action="store_true", help="show the policy's change as a unified diff")
    apply.add_argument("--json", action="store_true", help="print changed, key_arn, policy, allowed_pcr0 as JSON")
    options.add_kms_flags(apply)
    apply.set_defaults(func=cmd_policy_apply)
    lint = policy_cmds.add_parser("lint", help="check that a key policy releases keys only to attested enclaves")
    lint.add_argument("file", help="policy JSON ('-' for stdin)")
    lint.add_argument("--user-principal", action="append", metavar="ARN", help="principal of the enclave's host")
    lint.add_argument(
        "--signing-key", action="store_true", help="lint the owner's package-signing key's policy instead"
    )
    lint.add_argument("--owner-principal", action="append", metavar="ARN", help="with --signing-key: the owner")
    lint.add_argument("--json", action="store_true", help='print {"sound": ..., "problems": [...]} as JSON')
    lint.set_defaults(func=cmd_policy_lint)
    attest = commands.add_parser("attest", help="fetch a fresh attestation document from the enclave and verify it")
    attest.add_argument("--nonce", metavar="HEX", help="nonce to bind (default: 32 random bytes)")
    attest.add_argument("--json", action="store_true", help="print the verified document as JSON")
    _add_enclave_flags(attest, attest=False)
    attest.set_defaults(func=cmd_attest)

    for name in ("push", "pull"):
        _add_transfer(commands, name)

    _add_run(commands)
    from . import completion as completion_cmd
    from . import doctor as doctor_cmd
    from . import local as local_cmd
    from . import share as share_cmd
    from . import status as status_cmd
    from . import sync as sync_cmd

    sync_cmd.add_parser(commands, _add_enclave_flags, _client)

    status_cmd.register(commands, _add_enclave_flags, _client)
    share_cmd.register(commands, _add_enclave_flags, _client)
    completion_cmd.register(commands, build_parser)
    local_cmd.register(commands)
    doctor_cmd.register(commands)
    receipt = commands.add_parser("receipt", help="check a job's receipt")
    receipt_cmds = receipt.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    verify_receipt = receipt_cmds.add_parser("verify", help="verify a receipt offline against a release and outputs")
    verify_receipt.add_argument("file", help="the receipt (from `enclave run --receipt` or run_job.yml)")
    verify_receipt.add_argument("--release", required=True, help="the owner's release manifest (release.json)")
    verify_receipt.add_argument("--outputs", help="the pulled /output directory to check against the receipt")
    verify_receipt.add_argument("--root", action="append", metavar="PEM", help="trusted roots (default: AWS + local)")
    verify_receipt.add_argument("--allow-debug", action="store_true", help="accept debug-mode enclaves")
    verify_receipt.add_argument("--json", action="store_true", help="print what the receipt proves as JSON")
    verify_receipt.set_defaults(func=cmd_receipt_verify)
    _verbose_everywhere(parser)
    return parser


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept -v after any (sub)command too: `enclave run ... -v` as well as `enclave -v run ...`. SUPPRESS
    keeps a subcommand from resetting a -v given before it."""
    for action in parser._actions:  # argparse keeps its subparsers there and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                if "-v" not in sub._option_string_actions:
                    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="log debug output")  # fmt: skip
                _verbose_everywhere(sub)


class _PrintVersion(argparse.Action):
    """--version, looked up only when asked for: importlib.metadata costs ~10 ms of every command's start."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):  # noqa: A002
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help="show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {version()}")
        parser.exit()


def version() -> str:
    """The installed distribution's version, else (run from a checkout or the collection) galaxy.yml's."""
    from importlib import metadata

    try:
        return metadata.version("confidential-ml-nitro")
    except metadata.PackageNotFoundError:
        pass
    import yaml

    try:
        return str(yaml.safe_load((Path(__file__).parent.parent / "galaxy.yml").read_text())["version"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "unknown"


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    """build_parser(), or for `enclave [-v] run|push|pull ...` the same parser holding that command alone:
    building every command's parser costs ~10 ms of a job's start (or a push's). Help, errors and values are
    the same."""
    rest = list(argv)
    while rest[:1] in (["-v"], ["--verbose"]):
        rest.pop(0)
    if rest[:1] not in (["run"], ["push"], ["pull"]):
        return build_parser()
    parser, commands = _top_parser()
    if rest[0] == "run":
        _add_run(commands)
    else:
        _add_transfer(commands, rest[0])
    _verbose_everywhere(parser)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # Leaving the client's `with` closed the connection, which ends a running job in the enclave.
        print(f"enclave: interrupted: {INTERRUPTED.get(args.command, 'stopped')}", file=sys.stderr)
        return 130
    except EnclaveError as err:
        # The server's own message, without the protocol's operation and errno name (-v logs those).
        remote = isinstance(err, OSError) and getattr(err, "op", None) and err.strerror
        if remote:
            logging.debug("the enclave server answered %s", err)
        print(f"enclave: error: {remote or err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"enclave: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        # boto3's ClientError carries KMS's error code: show it rather than a traceback.
        code = getattr(err, "response", {}).get("Error", {}).get("Code") if hasattr(err, "response") else None
        if code:
            print(f"enclave: error: {code}: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
