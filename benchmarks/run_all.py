"""Run every benchmark and write one report: every figure and every ratio to its limit.

    python benchmarks/run_all.py [--quick] [--out build/bench]

Each benchmarks/bench_*.py measures its subject beside the limit in the same
run (raw socket, tmpfs copy, bare cipher, `python -c pass`) and prints JSON
with --json. This runner collects them, flattens the numbers and writes
report.json and report.md; ratios are the rows whose name says "ratio".
Numbers a benchmark did not measure in the run (its settings under "options"
or "config", its targets and figures from elsewhere under "given") are listed
apart, under a heading that says so, never among the measurements. A benchmark
that exits non-zero (one whose limit could not be measured, for one) is
reported as FAILED and makes this runner exit 1.
--quick runs smaller sizes (for a smoke run; the figures are noisier).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, full-size arguments, quick arguments)
# Top-level keys of a benchmark's JSON that hold numbers not measured in the run.
NOT_MEASURED = ("options", "config", "given")
BENCHMARKS = [
    ("bench_package.py", [], ["--size-mib", "128"]),
    ("bench_wire.py", [], ["--calls", "2000", "--bulk-mib", "128"]),
    ("bench_fuse.py", [], ["--size-mib", "128", "--files", "500"]),
    ("bench_runtime.py", [], ["--runs", "3"]),
    ("bench_transfer.py", ["--profile"], ["--size-mib", "64", "--repeat", "2", "--profile"]),
]


def flatten(data, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists by index; only numbers are kept."""
    out = {}
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return {prefix: data} if isinstance(data, int | float) and not isinstance(data, bool) else {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def run(script: str, args: list[str]) -> dict:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *args, "--json"], capture_output=True, text=True, check=False
    )
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}: {proc.stderr.strip()[-2000:]}", "seconds": elapsed}
    try:
        return {"results": json.loads(proc.stdout), "seconds": elapsed}
    except ValueError:
        return {"error": f"printed no JSON: {proc.stdout[-2000:]}", "seconds": elapsed}


def markdown(report: dict) -> str:
    lines = ["# Benchmark report", "", f"mode: {report['mode']}", ""]
    for name, entry in report["benchmarks"].items():
        lines += [f"## {name} ({entry['seconds']:.0f} s)", ""]
        if "error" in entry:
            lines += [f"FAILED: {entry['error']}", ""]
            continue
        results = entry["results"]
        figures = flatten({k: v for k, v in results.items() if k not in NOT_MEASURED})
        unmeasured = flatten({k: v for k, v in results.items() if k in NOT_MEASURED})
        ratios = {k: v for k, v in figures.items() if any(w in k.lower() for w in ("ratio", "_over_", "speedup"))}
        lines += ["| ratio to the limit | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in ratios.items()] or ["| (none reported) | |"]
        lines += ["", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in figures.items() if k not in ratios]
        if unmeasured:
            lines += ["", "| not measured in this run (settings, targets, figures from elsewhere) | value |"]
            lines += ["|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in unmeasured.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--out", default="build/bench", help="directory for report.json and report.md")
    parser.add_argument("--only", action="append", help="run only these scripts (e.g. bench_wire.py)")
    args = parser.parse_args(argv)
    report = {"mode": "quick" if args.quick else "full", "benchmarks": {}}
    for script, full, quick in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        print(f"running {script} ...", file=sys.stderr, flush=True)
        report["benchmarks"][script] = run(script, quick if args.quick else full)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "report.md").write_text(text)
    print(text)
    print(f"report written to {out}/report.md and {out}/report.json", file=sys.stderr)
    return 1 if any("error" in entry for entry in report["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
