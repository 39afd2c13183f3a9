"""bench/grouped_gemm.py (gpu_check.sh step 4) runs end to end in its CPU dry run, and its three layouts
compute the same rows (replica groups hold their home expert's weights)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_same_rows_in_every_layout(tmp_path):
    out = tmp_path / "gg.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "grouped_gemm.py"), "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    (r,) = rep["results"]
    assert set(r["ms"]) == {"home", "groups", "extra_calls"} and all(v > 0 for v in r["ms"].values())
    assert r["max_rel_diff_vs_home"] == {"home": 0.0, "groups": 0.0, "extra_calls": 0.0}
    assert len(r["splits_groups"]) == r["S"] + r["R"] and sum(r["splits_groups"]) == r["tokens"]
    assert "grouped GEMM" in proc.stdout
