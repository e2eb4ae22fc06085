"""Two real processes (torchrun, gloo on CPU): Trainer DDP, accelerate DDP and FSDP2.

Asserts what each process actually got (world size and wrapper), since some launchers silently run one process or
fall back to DDP, then that every process ends with bit-identical adapter weights and drew its own ranks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two torchrun processes per test

ROOT = Path(__file__).resolve().parents[1]
WRAPPERS = {
    "trainer": "DistributedDataParallel",
    "accelerate": "DistributedDataParallel",
    "fsdp2": "FSDPLlamaDecoderLayer",
}


@pytest.mark.parametrize("mode", sorted(WRAPPERS))
def test_two_processes_train_identical_adapters_with_independent_draws(mode, tmp_path):
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "examples" / "distributed.py"), "--mode", mode, "--model", "tiny", "--steps", "3"]
    command += ["--rows", "64", "--out", str(tmp_path / "run"), "--report", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    processes = json.loads(report.read_text())
    assert [p["rank"] for p in processes] == [0, 1]
    assert all(p["world_size"] == 2 for p in processes)
    assert all(p["wrapper"] == WRAPPERS[mode] for p in processes)
    assert processes[0]["adapter_hash"] == processes[1]["adapter_hash"]
    assert processes[0]["last_draws"] != processes[1]["last_draws"], "same seed, yet each process draws its own ranks"
