"""The prepared GPU script runs as-is: `python benchmarks/gpu_suite.py --quick` on CPU with the tiny models."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow  # a few minutes: every section in fresh processes
def test_gpu_suite_quick_runs_every_section_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--quick"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    assert "machine:" in out and "failed" not in out
    for section in ("### 1. SD1.5 LoRA DPO throughput", "### 2. SDXL LoRA DPO memory", "### 3. NPO-guided sampling",
                    "### 4. Reward scoring"):
        assert section in out, section
    assert "| cached |" in out and "| int8 base (torchao) |" in out
