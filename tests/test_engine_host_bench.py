"""``benchmarks/engine_host.py``: the real engine with the model stubbed at the
graph replay runs decode steps, streams every token to its drain, and writes
its figures with the command that made them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pdserve.benchmarks import engine_host
from pdserve.common.args import add_dataclass_args, config_from_args

pytestmark = pytest.mark.timeout(300)


def test_a_small_run_measures_every_case_and_streams_every_token(tmp_path: Path) -> None:
    out = tmp_path / "engine-host.json"
    argv = ["--batch-sizes", "3", "5", "--steps", "6", "--device-steps", "4", "--warmup-steps", "2",
            "--vocab-size", "1000", "--prompt-len", "20", "--page-size", "4", "--output-json", str(out)]
    subprocess.run([sys.executable, "-m", "pdserve.benchmarks.engine_host", *argv], check=True, timeout=240)
    result = json.loads(out.read_text())
    assert result["command"] == "python -m pdserve.benchmarks.engine_host " + " ".join(argv)
    rows = {(r["batch_size"], r["sampling"]): r for r in result["rows"]}
    assert set(rows) == {(b, s) for b in (3, 5) for s in ("stub", "device")}
    for (batch, sampling), row in rows.items():
        steps = 6 if sampling == "stub" else 4
        assert row["steps"] == steps and row["step_us"]["median"] > 0 and row["step_us"]["cpu"] > 0
        assert row["phases_us"]["step"] > 0 and row["phases_us"]["runner/step_inputs"] > 0
        # The first token, the warm-up steps and both measured passes reached the drain.
        assert row["tokens_streamed"] >= batch * (1 + 2 + 2 * steps)


def test_a_worker_gets_the_flags_of_its_config() -> None:
    cfg = engine_host.EngineHostConfig(batch_sizes=(8, 16), sampling=("stub",), disable_overlap_schedule=True,
                                       steps=7, output_json="x.json")
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, engine_host.EngineHostConfig)
    assert config_from_args(engine_host.EngineHostConfig, parser.parse_args(engine_host._argv_of(cfg))) == cfg
