"""`benchmarks/device_check.py`, the script for real accelerators, runs end to end on the CPU (kernels in interpret
mode, tiny sizes) and reports every check as passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
CHECKS = {"gdn forward", "gdn forward+backward", "gdn decode step", "grouped matmul", "tgmm",
          "grouped matmul gradients", "model forward logits", "model train step (loss, grad norm)",
          "model greedy decode (8 tokens)"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpu", "tpu"])
def test_device_check_runs_every_check_in_interpret_mode(family, tmp_path):
    out = tmp_path / "rows.json"
    args = [sys.executable, str(SCRIPT), "--size", "tiny", "--family", family, "--json", str(out)]
    if family == "tpu":
        args.append("--skip-model")  # the model check does not depend on the family; run it once
    result = subprocess.run(args, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "cpu" and report["family"] == family
    names = {row["name"] for row in report["rows"]}
    assert names == (CHECKS if family == "gpu" else {n for n in CHECKS if not n.startswith("model")})
    for row in report["rows"]:
        assert row["ok"] and row["max_err"] <= row["tol"], row
        if row["ms_pallas"] is not None:
            assert row["ms_pallas"] > 0 and row["ms_xla"] > 0 and row["flops"] > 0
