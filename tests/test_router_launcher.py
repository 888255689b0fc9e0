"""`pdserve up` / Cluster process management, with fake instances as the serve command."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from pdserve.launcher import Cluster, ClusterConfig, ClusterError, parse_args
from pdserve.tests.support.ports import free_port_block, is_listening, listening_port
from pdserve.tests.support.waiting import wait_until

FAKE_SERVE = (sys.executable, "-m", "pdserve.tests.support.fake_worker")


def fake_config(tmp_path: Path, **changes: object) -> ClusterConfig:
    first = free_port_block(8)
    config = ClusterConfig(port=first, bootstrap_port=first + 1, base_port=first + 2,
                           serve_command=FAKE_SERVE, log_dir=str(tmp_path / "logs"),
                           startup_timeout_s=30.0, stop_grace_s=5.0,
                           router_args=("--health-check-interval-s", "0.2"))
    return replace(config, **changes)


def test_cluster_serves_through_the_router_and_stops_every_child(tmp_path: Path) -> None:
    config = fake_config(tmp_path, num_prefill=1, num_decode=2)
    with Cluster(config) as cluster:
        processes = [c.process for c in cluster.children]
        assert [c.name for c in cluster.children] == [
            "bootstrap", "prefill-0", "decode-0", "decode-1", "router"]
        response = httpx.post(cluster.base_url + "/completions",
                              json={"model": "tiny", "prompt": "hi"}, timeout=10.0)
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"].startswith("[decode-")
        instances = httpx.get(cluster.bootstrap_url + "/instances").json()
        assert sorted(i["role"] for i in instances) == ["decode", "decode", "prefill"]
        workers = httpx.get(cluster.router_url + "/workers").json()
        assert sorted(w["url"] for w in workers) == sorted(
            cluster.instance_urls("prefill") + cluster.instance_urls("decode"))
    assert all(p.poll() is not None for p in processes)
    assert not any(is_listening(port) for port in range(config.port, config.base_port + 3))
    assert (tmp_path / "logs" / "router.log").exists()


def test_a_dying_child_is_noticed_and_everything_stops(tmp_path: Path) -> None:
    cluster = Cluster(fake_config(tmp_path, num_prefill=0, num_decode=0, num_colocated=1))
    cluster.start()
    try:
        processes = [c.process for c in cluster.children]
        instance = next(c for c in cluster.children if c.name == "null-0")
        instance.process.send_signal(signal.SIGKILL)
        started = time.monotonic()
        assert cluster.wait(threading.Event()) == 1
        assert time.monotonic() - started < 2.0
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in processes)


def test_startup_failure_names_the_child_and_cleans_up(tmp_path: Path) -> None:
    crash = (sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(3)")
    config = fake_config(tmp_path, serve_command=crash)
    cluster = Cluster(config)
    with pytest.raises(ClusterError, match=r"exited with code 3(.|\n)*no GPU here"):
        cluster.start()
    assert cluster.children == []
    assert not is_listening(config.bootstrap_port)


def test_busy_port_is_refused_before_starting_anything(tmp_path: Path) -> None:
    config = fake_config(tmp_path)
    with listening_port(config.port):
        with pytest.raises(ClusterError, match=f"port {config.port}"):
            Cluster(config).start()


def test_overlapping_ports_are_refused_before_starting_anything(tmp_path: Path) -> None:
    base = fake_config(tmp_path)
    config = replace(base, base_port=base.port)
    cluster = Cluster(config)
    with pytest.raises(ClusterError, match="overlap"):
        cluster.start()
    assert cluster.children == []


def _up_argv(config: ClusterConfig, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pdserve.cli", "up", "--num-colocated", "1",
            "--port", str(config.port), "--bootstrap-port", str(config.bootstrap_port),
            "--base-port", str(config.base_port), "--serve-command", " ".join(FAKE_SERVE),
            "--startup-timeout-s", "30", "--router-args", "--health-check-interval-s 0.2",
            *extra]


def test_pdserve_up_smoke_prints_an_answer_and_exits_0(tmp_path: Path) -> None:
    config = fake_config(tmp_path)
    done = subprocess.run(_up_argv(config, "--smoke"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"pdserve is up: OpenAI base URL http://127.0.0.1:{config.port}/v1" in done.stdout
    assert "smoke test: 'The capital of France is' -> '[null-" in done.stdout
    assert not is_listening(config.port) and not is_listening(config.bootstrap_port)


def test_pdserve_up_stops_its_children_on_sigterm(tmp_path: Path) -> None:
    config = fake_config(tmp_path)
    launcher = subprocess.Popen(_up_argv(config), stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "pdserve is up" in launcher.stdout.readline(), 30.0, 0.0,
                   "`pdserve up` never said it was up")
        assert is_listening(config.base_port)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=15) == 0
        assert not any(is_listening(p) for p in (config.port, config.bootstrap_port, config.base_port))
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=15)


def test_up_flags() -> None:
    config, smoke = parse_args(["--num-colocated", "2", "--", "--page-size", "32"])
    assert (config.num_prefill, config.num_decode, config.num_colocated) == (0, 0, 2)
    assert config.serve_args == ("--page-size", "32") and not smoke
    config, smoke = parse_args(["--smoke", "--num-decode", "3"])
    assert (config.num_prefill, config.num_decode, smoke) == (1, 3, True)
    with pytest.raises(SystemExit):
        parse_args(["--num-colocated", "1", "--num-prefill", "1"])


def test_gpu_ids_give_each_instance_its_own_device() -> None:
    from pdserve.launcher import Cluster, parse_args

    config, _ = parse_args(["--num-prefill", "2", "--num-decode", "2", "--gpu-ids", "0", "1", "2", "3"])
    cluster = Cluster(config)
    roles = ["prefill", "prefill", "decode", "decode"]
    devices = [cluster._serve_argv(r, config.base_port + i) for i, r in enumerate(roles)]
    assert [argv[argv.index("--base-gpu-id") + 1] for argv in devices] == ["0", "1", "2", "3"]
    plain, _ = parse_args(["--num-prefill", "1", "--num-decode", "1"])
    assert "--base-gpu-id" not in Cluster(plain)._serve_argv("prefill", plain.base_port)


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


def test_key_and_secret_reach_children_through_their_environment(tmp_path: Path) -> None:
    key, secret = "launcher-key-5d1e", "launcher-secret-0b7c"
    config = fake_config(tmp_path, num_prefill=1, num_decode=1, api_key=key, cluster_secret=secret)
    with Cluster(config) as cluster:
        assert httpx.get(cluster.router_url + "/health").status_code == 200
        assert httpx.get(cluster.base_url + "/models").status_code == 401
        assert httpx.get(cluster.base_url + "/models", headers=cluster.headers()).status_code == 200
        assert httpx.get(cluster.bootstrap_url + "/instances").status_code == 401
        # The fake instances registered: they got the secret.
        listed = httpx.get(cluster.bootstrap_url + "/instances", headers={"Authorization": f"Bearer {secret}"})
        assert sorted(i["role"] for i in listed.json()) == ["decode", "prefill"]
        for child in cluster.children:
            assert key not in " ".join(child.argv) and secret not in " ".join(child.argv)
            environ = _environ(child.process.pid)
            assert environ["PDSERVE_API_KEY"] == key and environ["PDSERVE_CLUSTER_SECRET"] == secret


def test_up_reads_key_and_secret_from_flags_file_or_environment(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    config, _ = parse_args(["--api-key", "k1", "--cluster-secret-file", str(path)])
    assert (config.api_key, config.cluster_secret) == ("k1", "from-file")
    assert "k1" not in repr(config) and "from-file" not in repr(config)
    monkeypatch.setenv("PDSERVE_API_KEY", "k2")
    monkeypatch.setenv("PDSERVE_CLUSTER_SECRET", "s2")
    config, _ = parse_args([])
    assert (config.api_key, config.cluster_secret) == ("k2", "s2")
    with pytest.raises(SystemExit):
        parse_args(["--cluster-secret", "a", "--cluster-secret-file", str(path)])


def test_a_child_restarted_from_a_short_lived_thread_outlives_that_thread(tmp_path: Path) -> None:
    """Children die with the thread that forked them (PR_SET_PDEATHSIG); the
    cluster forks them all from its own thread, whoever asks."""
    import threading

    with Cluster(fake_config(tmp_path, num_prefill=1, num_decode=1)) as cluster:
        restarted: list = []
        worker = threading.Thread(target=lambda: restarted.append(cluster.restart("prefill-0")))
        worker.start()
        worker.join()
        child = restarted[0]
        url = cluster.instance_urls("prefill")[0]
        # The thread ended before the child got past its imports: had its end sent the
        # parent-death signal (SIGKILL), the child would never listen.
        wait_until(lambda: is_listening(int(url.rsplit(":", 1)[1])) or child.process.poll() is not None, 30.0, 0.1,
                   lambda: "the restarted child never listened")
        assert child.process.poll() is None
        assert httpx.get(url + "/health", timeout=5.0).status_code == 200
