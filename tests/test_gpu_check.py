"""benchmarks/gpu_check.sh and its helper, proven on CPU (no GPU here): the dry run's model steps on a
small model, and the time guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_parses_and_its_time_guard_stops_every_step():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    env = dict(os.environ, BUDGET="3", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(SCRIPT), "--cpu"], env=env, capture_output=True, text=True, timeout=60)
    print(r.stdout)
    assert r.returncode == 124 and "skipped, out of time" in r.stdout and "status 124" in r.stdout


def test_gpu_check_refuses_cuda_without_a_device():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                        "--seconds", "0.5", "--budget", "240", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    print(r.stdout[-2500:], r.stderr[-1500:])
    assert r.returncode == 0
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| llama-2x256-")]
    assert [ln.split("|")[1].strip() for ln in table] == ["llama-2x256-Q4_K_M.gguf", "llama-2x256-Q4_0.gguf"]
    for ln in table:
        cells = [c.strip() for c in ln.split("|")[1:-1]]
        tok_s, roof = float(cells[4]), float(cells[5])
        assert 0 < tok_s < roof * 1.5  # a rate, and not beyond what the bandwidth allows (cache effects aside)
