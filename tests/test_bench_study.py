"""The PD-versus-colocated study: aggregation and tables on fake results, CLI, and
one end-to-end pass with a fake server standing in for ``pdserve up``."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import pytest
from pdserve.benchmarks.metrics import RequestRecord, compute_metrics, parse_slo
from pdserve.benchmarks.pd_vs_colocated import (
    StudyConfig,
    config_from_argv,
    parse_layout,
    port_free,
    run_study,
    up_command,
)
from pdserve.benchmarks.runner import RunPoint, RunResult
from pdserve.benchmarks.study_report import (
    comparison_json,
    comparison_markdown,
    goodput_ratios,
    study_curves,
    study_rows,
)
from pdserve.tests.support.ports import free_port, free_port_block

SLO = "ttft_ms=1000,itl_ms=25"


def _result(scenario: str, rate: float, ttft_s: float, gap_s: float, num_ok: int, num_failed: int = 0) -> RunResult:
    """A run of ``num_ok`` identical successful requests (5 tokens) and some failures."""
    times = tuple(ttft_s + i * gap_s for i in range(5))
    ok = [RequestRecord(index=i, success=True, start_s=0.0, e2e_s=times[-1], ttft_s=ttft_s,
                        chunk_times_s=times, chunk_tokens=(1,) * 5, prompt_tokens=8, output_tokens=5)
          for i in range(num_ok)]
    bad = [RequestRecord(index=num_ok + i, success=False, start_s=0.0, e2e_s=0.1, error="x")
           for i in range(num_failed)]
    records = ok + bad
    return RunResult(RunPoint(scenario, rate, None), compute_metrics(records, 2.0, parse_slo(SLO)), tuple(records))


def _fake_rows() -> list:
    colocated = [
        _result("D(64,16)", 1.0, 0.5, 0.04, 4),  # ITL 40 ms misses the 25 ms SLO: goodput 0
        _result("D(64,16)", 2.0, 0.2, 0.02, 4),
    ]
    pd = [
        _result("D(64,16)", 1.0, 0.3, 0.01, 4),
        _result("D(64,16)", 2.0, 0.2, 0.01, 2, num_failed=2),
    ]
    return study_rows("pd", pd) + study_rows("colocated", colocated)


def test_rows_carry_the_latency_percentiles_and_goodput() -> None:
    rows = _fake_rows()
    pd_fast = next(r for r in rows if r.mode == "pd" and r.request_rate == 1.0)
    assert pd_fast.ttft_p50_ms == pytest.approx(300.0) and pd_fast.ttft_p99_ms == pytest.approx(300.0)
    assert pd_fast.itl_p50_ms == pytest.approx(10.0) and pd_fast.itl_p99_ms == pytest.approx(10.0)
    assert pd_fast.goodput == pytest.approx(4 / 2.0)
    pd_failing = next(r for r in rows if r.mode == "pd" and r.request_rate == 2.0)
    assert (pd_failing.completed, pd_failing.failed) == (2, 2)
    assert pd_failing.slo_attainment == pytest.approx(0.5)


def test_goodput_ratio_is_pd_over_colocated() -> None:
    ratios = goodput_ratios(_fake_rows())
    assert ratios[("D(64,16)", 1.0)] is None  # colocated met no SLO: unbounded
    assert ratios[("D(64,16)", 2.0)] == pytest.approx((2 / 2.0) / (4 / 2.0))
    assert goodput_ratios(study_rows("pd", [_result("D(1,1)", 1.0, 0.1, 0.01, 1)])) == {}


def test_markdown_table_orders_by_scenario_rate_mode() -> None:
    text = comparison_markdown(_fake_rows(), SLO)
    lines = [line for line in text.splitlines() if line.startswith("| D(64,16)")]
    assert [line.split(" | ")[1:3] for line in lines[:4]] == [
        ["1.00", "colocated"], ["1.00", "pd"], ["2.00", "colocated"], ["2.00", "pd"]]
    assert "| D(64,16) | 1.00 | colocated | 4/0 | 500.0 | 500.0 | 40.00 | 40.00 | 0.00 | 0% |" in text
    assert "| D(64,16) | 2.00 | 0.50x |" in text
    assert text.startswith(f"SLO: {SLO}")


def test_json_holds_rows_ratios_and_finite_values() -> None:
    rows = _fake_rows() + study_rows("pd", [_result("D(8,8)", math.inf, 0.1, 0.01, 1)])
    doc = comparison_json(rows, {"slo": SLO})
    text = json.dumps(doc, allow_nan=False)  # infinite rates must not produce invalid JSON
    assert '"request_rate": "inf"' in text
    assert len(doc["rows"]) == 5
    assert set(doc["rows"][0]) >= {"mode", "scenario", "request_rate", "ttft_p50_ms", "ttft_p99_ms",
                                   "itl_p50_ms", "itl_p99_ms", "goodput", "slo_attainment"}
    assert {r["request_rate"] for r in doc["goodput_ratios"]} == {1.0, 2.0}


def test_curves_group_by_scenario_and_mode(tmp_path: Path) -> None:
    grid, inf_x = study_curves(_fake_rows())
    assert inf_x is None
    assert set(grid) == {"D(64,16)"} and set(grid["D(64,16)"]) == {"pd", "colocated"}
    assert sorted(p.x for p in grid["D(64,16)"]["pd"]) == [1.0, 2.0]
    pytest.importorskip("matplotlib")
    from pdserve.benchmarks.plot import plot_grid

    plot_grid(grid, "request rate (req/s)", str(tmp_path / "g.png"), "t", inf_x)
    assert (tmp_path / "g.png").stat().st_size > 10_000


def test_layouts_and_launch_commands() -> None:
    assert parse_layout(None, 8) == (4, 4)
    assert parse_layout("1:3", 4) == (1, 3) and parse_layout("2P6D", 8) == (2, 6)
    for bad, gpus in (("3:3", 4), ("0:2", 2), ("1-1", 2)):
        with pytest.raises(ValueError):
            parse_layout(bad, gpus)
    cfg = StudyConfig(model_path="m", num_gpus=4, layout="1:3", extra_serve_args=("--page-size", "16"),
                      launcher="pdserve up", port=4321)
    colocated = up_command(cfg, "colocated")
    assert colocated[:2] == ["pdserve", "up"]
    assert " ".join(colocated).endswith("--num-prefill 0 --num-decode 0 --num-colocated 4 --model-path m "
                                        "-- --page-size 16")
    pd = " ".join(up_command(cfg, "pd"))
    assert "--num-prefill 1 --num-decode 3 --num-colocated 0" in pd and "--port 4321" in pd


def test_cli_smoke_preset_and_extra_args() -> None:
    cfg = config_from_argv(["--smoke", "--num-prompts", "5", "--extra-serve-args", "--page-size 8",
                            "--", "--disable-radix-cache"])
    assert cfg.model_path == "tiny" and cfg.num_prompts == 5  # explicit flags beat the preset
    assert cfg.scenarios == ("D(64,8)", "D(16,16)", "N(48,16)/(8,2)") and cfg.request_rates == (2.0, 4.0)
    assert cfg.extra_serve_args == ("--page-size", "8", "--disable-radix-cache")
    with pytest.raises(SystemExit):
        config_from_argv(["--scenarios", "D(1)"])
    with pytest.raises(SystemExit):
        config_from_argv(["--num-gpus", "2", "--layout", "2:2"])


def test_study_end_to_end_with_a_fake_cluster(tmp_path: Path) -> None:
    fake = f"{shlex.quote(sys.executable)} -m pdserve.tests.support.bench_fake_server --ttft-s 0.05 --chunk-interval-s 0.01"
    port = free_port()
    cfg = StudyConfig(model_path="tiny", num_gpus=2, scenarios=("D(8,4)",), request_rates=(20.0, 40.0),
                      num_prompts=4, slo=SLO, port=port, launcher=fake, output_dir=str(tmp_path),
                      warmup_requests=1, startup_timeout_s=30.0, request_timeout_s=10.0)
    rows = run_study(cfg)
    assert port_free("127.0.0.1", port)  # both clusters were stopped
    assert [(r.mode, r.request_rate) for r in rows] == [
        ("colocated", 20.0), ("colocated", 40.0), ("pd", 20.0), ("pd", 40.0)]
    assert all(r.completed == 4 and r.failed == 0 for r in rows)
    assert all(40 <= r.ttft_p50_ms < 200 for r in rows)
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["config"]["layout"] == "1P1D" and len(doc["rows"]) == 4
    assert "| D(8,4) | 20.00 | pd |" in (tmp_path / "comparison.md").read_text()
    assert json.loads((tmp_path / "bench_pd.json").read_text())["config"]["mode"] == "pd"
    if (tmp_path / "comparison.png").exists():
        assert (tmp_path / "comparison.png").stat().st_size > 10_000


@pytest.mark.slow
def test_study_smoke_on_real_clusters(tmp_path: Path) -> None:
    """Both modes of the built-in tiny model on CPU, one scenario (about 45 s)."""
    # `pdserve up` numbers its instances' ports up from --base-port: a block, not one free port.
    first = free_port_block(16)
    ports = [first, first + 1, first + 2]
    argv = ["--smoke", "--scenarios", "D(32,8)", "--num-prompts", "4", "--port", str(ports[0]),
            "--output-dir", str(tmp_path), "--request-timeout-s", "60",
            "--up-args", f"--bootstrap-port {ports[1]} --base-port {ports[2]}"]
    cfg = config_from_argv(argv)
    assert cfg.model_path == "tiny" and cfg.request_rates == (2.0, 4.0)
    rows = run_study(cfg)
    assert port_free("127.0.0.1", ports[0])
    assert sorted((r.mode, r.request_rate) for r in rows) == [
        ("colocated", 2.0), ("colocated", 4.0), ("pd", 2.0), ("pd", 4.0)]
    assert all(r.completed == 4 and r.failed == 0 for r in rows)
    assert all(r.ttft_p50_ms > 0 and r.itl_p50_ms > 0 for r in rows)
    assert (tmp_path / "comparison.md").exists() and (tmp_path / "comparison.json").exists()
