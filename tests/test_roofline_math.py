"""The roofline benchmark's arithmetic (the GPU timings themselves run on the device)."""

from __future__ import annotations

from pdserve.benchmarks.roofline import Machine, ModelCost, check_targets


def test_llama_1b_costs_count_every_projection_and_the_kv_cache():
    cost = ModelCost.of_name("llama-3.2-1b")
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 q / 8 kv heads of 64, MLP 8192, vocab 128256.
    per_layer = 2048 * (2048 + 2 * 512) + 2048 * 2048 + 3 * 2048 * 8192
    assert cost.linear_params == 16 * per_layer
    assert cost.lm_params == 128256 * 2048
    assert cost.kv_bytes_per_token == 16 * 2 * 512 * 2  # layers x (K, V) x kv width x bf16
    num_bytes, flops = cost.decode(batch=1, context=1024)
    assert num_bytes == 2 * (cost.linear_params + cost.lm_params) + 1025 * cost.kv_bytes_per_token + 128256 * 4
    assert flops == 2 * (cost.linear_params + cost.lm_params) + 4 * 1024 * 2048 * 16
    _, prefill_flops = cost.prefill(2048)
    # One token's LM head only: the prompt's other logits are never computed.
    assert prefill_flops == 2 * 2048 * cost.linear_params + 2 * cost.lm_params + 2 * 2048**2 * 2048 * 16


def test_floor_is_the_slower_of_bandwidth_and_compute():
    machine = Machine("gpu", copy_bytes_per_s=1e12, matmul_flops_per_s=1e15)
    assert machine.floor_s(2e9, 1e12) == 2e-3
    assert machine.floor_s(1e9, 5e12) == 5e-3


def test_targets_use_the_lead_model_and_the_best_transfer():
    rows = [
        {"kind": "decode", "batch": 1, "fraction": 0.8},
        {"kind": "decode", "batch": 256, "fraction": 0.5},
        {"kind": "prefill", "tokens": 2048, "fraction": 0.6},
    ]
    results = {
        "models": [{"model": "m", "rows": rows}],
        "transfer": {"backend": "cuda_ipc", "fraction": 0.55, "ttft_share": 0.04},
        "http": {"ratio": 1.2},
    }
    got = {t["target"]: t["met"] for t in check_targets(results)}
    assert got == {
        "m decode bs=1 fraction": True,
        "m decode bs=256 fraction": False,
        "m prefill 2048 fraction": True,
        "transfer 2048 fraction of copy (cuda_ipc)": True,
        "transfer share of TTFT (cuda_ipc)": False,
        "HTTP ITL median / decode step": True,
    }


def test_transfer_targets_use_the_exposed_time_when_measured():
    results = {"models": [], "transfer": {"backend": "cuda_ipc", "fraction": 0.1, "fraction_exposed": 0.7,
                                          "ttft_share": 0.01}}
    got = {t["target"]: (t["value"], t["met"]) for t in check_targets(results)}
    assert got == {"transfer 2048 fraction of copy (cuda_ipc)": (0.7, True),
                   "transfer share of TTFT (cuda_ipc)": (0.01, True)}


def test_prefill_cost_of_a_batch_and_of_a_chunk_over_a_cached_prefix():
    cost = ModelCost.of_name("llama-3.2-1b")
    width = 2048 * 16  # q heads x head dim x layers
    one_bytes, one_flops = cost.prefill(512)
    four_bytes, four_flops = cost.prefill(512, num_seqs=4)
    # Four prompts of 128: the same projections, four LM-head rows, a quarter of the attention pairs.
    assert four_bytes == one_bytes
    assert four_flops - one_flops == 6 * cost.lm_params - 4 * (512 * 256 - 4 * 128 * 64) * width
    ext_bytes, ext_flops = cost.prefill(512, prefix=512)
    assert ext_bytes == one_bytes + 512 * cost.kv_bytes_per_token  # the prefix's KV is read
    assert ext_flops == one_flops + 4 * 512 * 512 * width  # every new token also sees the whole prefix


def test_host_path_targets_per_model_shape():
    rows = [{"kind": "prefill", "tokens": 512, "fraction": 0.55, "host_share": 0.2},
            {"kind": "prefill_eager", "tokens": 512, "fraction": 0.1, "host_share": 9.0},
            {"kind": "prefill_batch", "tokens": 512, "fraction": 0.5, "host_share": 0.4},
            {"kind": "prefill_extend", "tokens": 256, "fraction": 0.5, "host_share": 2.0},
            {"kind": "decode", "batch": 128, "fraction": 0.81}]
    got = {t["target"]: t["met"] for t in check_targets({"models": [{"model": "llama-3.2-1b", "rows": rows}]})}
    assert got["llama-3.2-1b prefill tokens=512 fraction"] is True
    assert got["llama-3.2-1b decode batch=128 fraction"] is True
    assert got["llama-3.2-1b prefill 512 host launch / GPU span"] is True
    assert got["llama-3.2-1b prefill_batch 512 host launch / GPU span"] is False
    # Eager rows are the comparison, and prefills under 512 tokens have no host target.
    assert not any("prefill_eager" in k or "prefill_extend 256" in k for k in got)


def test_http_ttft_is_measured_against_a_server_and_merged(main_server, tmp_path):
    import json

    from pdserve.benchmarks.roofline import TTFT_CLIENTS, http_ttft_ms, merge_ttft

    for seed, client in enumerate(TTFT_CLIENTS):  # either client reads the answer
        ttft_ms, phases_ms = http_ttft_ms(main_server.url, num_prompts=2, input_len=64, client=client, seed=seed)
        assert 0 < ttft_ms < 30_000
        assert {"front", "prefill"} <= set(phases_ms) and all(v >= 0 for v in phases_ms.values())
        assert phases_ms["prefill"] < ttft_ms
    result = tmp_path / "r.json"
    # The server's model, not the result's first, sets the floor.
    result.write_text(json.dumps({"models": [{"model": "llama-3.2-1b", "rows": []}],
                                  "machine": {"gpu": "g", "copy_bytes_per_s": 1e12, "matmul_flops_per_s": 1e15}}))
    merged = merge_ttft(ttft_ms, 512, "test", str(result), model="llama-3.1-8b", phases_ms=phases_ms,
                        by_client_ms={"http.client": ttft_ms})
    floor_ms = Machine("g", 1e12, 1e15).floor_s(*ModelCost.of_name("llama-3.1-8b").prefill(512)) * 1e3
    assert merged["http_ttft"]["model"] == "llama-3.1-8b"
    assert merged["http_ttft"]["ratio"] == ttft_ms / floor_ms
    assert merged["http_ttft"]["phases_median_ms"] == phases_ms
    assert merged["http_ttft"]["ttft_median_ms_by_client"] == {"http.client": ttft_ms}
    assert any(t["target"].startswith("HTTP TTFT 512") for t in merged["targets"])


def test_prefill_host_split_times_each_phase_and_restores_the_runner():
    from types import SimpleNamespace

    from pdserve.benchmarks.roofline import _prefill_phase_timer

    calls = []

    def phase(name):
        return lambda *args: calls.append(name)

    graph = SimpleNamespace(replay=phase("replay"))
    inputs = SimpleNamespace(load=phase("load"))
    runner = SimpleNamespace(_step_inputs=phase("step"), prefill_graphs=SimpleNamespace(inputs=inputs, _graphs={512: graph}))
    originals = (runner._step_inputs, inputs.load, graph.replay)

    timer = _prefill_phase_timer(runner, graphs=True)
    runner._step_inputs()
    inputs.load()
    graph.replay()
    timer.restore()
    assert calls == ["step", "load", "replay"]
    assert set(timer.totals_s) == {"step inputs", "graph inputs copy", "graph launch"}
    assert (runner._step_inputs, inputs.load, graph.replay) == originals

    eager = _prefill_phase_timer(runner, graphs=False)  # no graph: the step's inputs alone
    runner._step_inputs()
    eager.restore()
    assert set(eager.totals_s) == {"step inputs"}


def test_kernel_profile_fills_decode_and_one_prompt_prefill_rows_in_a_runner_of_its_own(monkeypatch):
    from pdserve.benchmarks import roofline

    runners = []
    monkeypatch.setattr(roofline, "_runner", lambda cfg, name, pool: runners.append(name) or object())
    monkeypatch.setattr(roofline, "decode_kernels", lambda runner, batch, context: [{"name": f"d{batch}", "share": 1.0}])
    monkeypatch.setattr(roofline, "prefill_kernels", lambda runner, tokens: [{"name": f"p{tokens}", "share": 1.0}])
    info = {"model": "llama-3.2-1b", "rows": [{"kind": "decode", "batch": 8}, {"kind": "prefill", "tokens": 512},
                                              {"kind": "prefill_batch", "tokens": 512}]}
    roofline.profile_model(roofline.RooflineConfig(decode_batches=(8,), prefill_lengths=(512,)), info)
    assert runners == ["llama-3.2-1b"]
    assert [r.get("kernels") for r in info["rows"]] == [[{"name": "d8", "share": 1.0}],
                                                       [{"name": "p512", "share": 1.0}], None]
