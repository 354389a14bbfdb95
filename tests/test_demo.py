"""`prefloop demo` end to end: the README's promise, checked on every CI run."""

from __future__ import annotations

import json
import subprocess

import pytest


@pytest.mark.slow
def test_demo_improves_heldout_accuracy_by_20_points(tmp_path):
    """The demo runs >= 5 real rounds and lifts held-out greedy accuracy by >= 20 points (deterministic per seed)."""
    proc = subprocess.run(["prefloop", "-q", "demo", "--out", str(tmp_path / "demo")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "demo" / "run" / "manifest.json").read_text())
    assert manifest["status"] == "done"
    accuracy = [r["phases"]["eval"]["summary"]["accuracy"] for r in manifest["rounds"]]
    assert len(accuracy) >= 6, accuracy
    assert accuracy[0] < 0.4, f"the base should start weak: {accuracy}"
    assert accuracy[-1] - accuracy[0] >= 0.20, accuracy
    assert "Held-out accuracy" in (tmp_path / "demo" / "run" / "report.md").read_text()
