"""docs/THREAT_MODEL.md stays true to the code: every mitigation names tests that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "docs" / "THREAT_MODEL.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def mitigation_rows():
    for line in MODEL.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0] not in ("threat", "---"):
            yield line, cells[2]


def test_every_mitigation_names_tests_that_exist():
    rows = list(mitigation_rows())
    assert len(rows) > 20
    for line, tests in rows:
        references = REFERENCE.findall(tests)
        assert references, f"this mitigation names no test: {line}"
        current = None
        for path, name in references:
            current = path or current
            assert current, f"a test name without its file: {line}"
            source = (ROOT / current).read_text()
            if name:
                assert re.search(rf"def {name}\b", source), f"{current}::{name} does not exist ({line})"
