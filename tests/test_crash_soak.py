"""Crash soak of elastic training in CI (issue 12): `nemo-elastic train` is SIGKILLed 5 times —
at a random moment, during a checkpoint save, at the curriculum stage transition — and rerun;
no process of a killed run survives it, and the final checkpoint (model, optimizer, router, RNG
states) is bit-identical to an uninterrupted run's, with every iteration in `metrics.jsonl`
once.  `bench/bench_crash_soak.py` is the same soak, longer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_crash_soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("bench_crash_soak", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_elastic_training_survives_five_sigkills_bit_exactly(tmp_path):
    soak = _soak_module()
    summary = soak.crash_soak(tmp_path, kills=5, seed=0, stage1=6, stage2=6)
    cycles = summary["cycles"]
    assert summary["kills"] == 5, cycles
    assert [c["kind"] for c in cycles] == ["random", "save", "transition", "random", "save"]
    assert summary["kills_during_save"] == 2 and summary["kills_at_transition"] == 1
    for c in cycles:
        if c["kind"] == "save":  # it really died mid-save: the partial directory is left behind
            assert c["partial_save_left"], c
    assert summary["orphans"] == []
    assert summary["final_iteration"] == ["iter_0000012", "iter_0000012"]
    assert summary["tensors_compared"] > 100 and summary["differing_entries"] == []
    assert summary["metrics_iterations"] == list(range(1, 13))
    assert summary["metrics_equal_reference"]


def test_the_orphan_probe_sees_a_tagged_process():
    """The control of the `orphans == []` check: a live tagged process is found."""
    import os
    import subprocess
    import sys

    soak = _soak_module()
    env = dict(os.environ, **{soak.TAG: "probe-control"})
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        assert soak.tagged_processes("probe-control") == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert soak.tagged_processes("probe-control") == []
