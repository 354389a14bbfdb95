"""The README's measured numbers come from bench/results/ (bench/readme.py renders them), never typed by hand."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
MEASURED = re.compile(r"\d[\d,.]*\s*(%|x\b|×|tok/s|pairs/s|min\b|MB\b)")


def test_readme_tables_are_what_the_results_files_say():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "readme.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_no_measured_table_row_outside_the_rendered_blocks():
    """A table row with a measurement (a %, a speedup, tok/s, pairs/s, minutes, MB) must sit inside a
    `<!-- bench:NAME -->` block, where bench/readme.py writes it from a results file."""
    outside = re.sub(r"<!-- bench:\w+ -->.*?<!-- /bench -->", "", (ROOT / "README.md").read_text(), flags=re.S)
    rows = [line for line in outside.splitlines() if line.startswith("|") and MEASURED.search(line)]
    assert rows == []
