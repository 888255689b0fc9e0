"""``pdserve up``: a whole local cluster from one command, and the same as a Python API.

Start order: bootstrap service, then every instance (prefill, decode or
colocated, each ``pdserve serve`` on its own port from ``base_port``), then the
router pointed at them. Every child is a separate process in its own process
group, so stopping a child also stops whatever it spawned. The cluster is up
when the router's ``/health`` answers 200 (every role has a healthy worker)
and so does every instance's.

On Ctrl-C or SIGTERM, or when any child dies, every child is stopped (SIGTERM,
then SIGKILL after a grace period); a dead child makes the exit status non-zero.
If the launcher itself dies, by any signal, its children follow within a
moment (``web/lifeline.py``: PR_SET_PDEATHSIG plus a pipe each child
watches): no orphan keeps the ports. PR_SET_PDEATHSIG follows the thread that
started a child, so every child is started from one thread the cluster owns
until it stops, whichever thread calls ``start`` or ``restart``.

With ``--api-key`` the router and every instance want the key (the router
presents it to the instances); with a cluster secret the bootstrap service
wants it from every instance. Both reach the children through their
environment, never their command lines, which ``ps`` shows to every user.

    with Cluster(ClusterConfig(num_prefill=1, num_decode=1)) as cluster:
        openai.OpenAI(base_url=cluster.base_url, api_key="none")
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import httpx
from pdserve.common import env
from pdserve.common.args import add_dataclass_args, config_from_args, flag, read_secret
from pdserve.common.roles import Role
from pdserve.common.startup import StartupError, check_port_free, flag_error, one_line
from pdserve.router.policies import POLICIES
from pdserve.transfer.base import TRANSFER_BACKENDS
from pdserve.web.auth import bearer_headers
from pdserve.web.lifeline import die_with_parent

POLL_INTERVAL_S = 0.2
SMOKE_PROMPT = "The capital of France is"


class ClusterError(RuntimeError):
    """The cluster could not start, or a child died."""


@dataclass(frozen=True)
class ClusterConfig:
    num_prefill: int | None = field(default=None, metadata=flag("prefill instances (default: 1, or 0 with --num-colocated)"))
    num_decode: int | None = field(default=None, metadata=flag("decode instances (default: 1, or 0 with --num-colocated)"))
    num_colocated: int = field(default=0, metadata=flag("colocated instances behind the router (instead of prefill/decode)"))
    model_path: str = field(default="tiny", metadata=flag("model of every instance: HF directory, built-in preset or config.json"))
    host: str = field(default="127.0.0.1", metadata=flag("bind address of every child"))
    port: int = field(default=30000, metadata=flag("the router's port, i.e. the OpenAI endpoint"))
    bootstrap_port: int = field(default=8998, metadata=flag("the bootstrap service's port"))
    base_port: int = field(default=31000, metadata=flag("instance i listens on base_port + i"))
    transfer_backend: str = field(default="nixl", metadata=flag("KV transfer backend of every PD instance"))
    policy: str = field(default="cache_aware", metadata=flag("the router's load-balancing policy"))
    startup_timeout_s: float = field(default=300.0, metadata=flag("seconds the whole cluster may take to become healthy"))
    stop_grace_s: float = field(default=10.0, metadata=flag("seconds between SIGTERM and SIGKILL when stopping a child"))
    log_dir: str | None = field(default=None, metadata=flag("write each child's log here (default: this terminal)"))
    smoke: bool = field(default=False, metadata=flag("send one completion once up, print it, shut down"))
    serve_args: tuple[str, ...] = field(default=(), metadata=flag("", skip=True))  # the flags after --
    router_args: tuple[str, ...] = field(default=(), metadata=flag(
        "extra router flags, one shell-quoted string", type=shlex.split))
    serve_command: tuple[str, ...] | None = field(default=None, metadata=flag(
        "command that starts one instance, one shell-quoted string (default: this Python's pdserve serve)",
        type=shlex.split))
    api_key: str | None = field(default=None, repr=False, metadata=flag(
        "the key clients present to the router, and the router to the instances (default: $PDSERVE_API_KEY)"))
    cluster_secret: str | None = field(default=None, repr=False, metadata=flag(
        "the secret of the bootstrap service (visible in `ps`: prefer --cluster-secret-file or "
        "$PDSERVE_CLUSTER_SECRET)"))
    cluster_secret_file: str | None = field(default=None, metadata=flag("file holding the cluster secret"))
    gpu_ids: tuple[str, ...] = field(default=(), metadata=flag(
        "GPUs of each instance, in launch order (prefill, decode, colocated), reused cyclically: "
        "'0' is one GPU, '0,1' two ranks of one tensor-parallel instance (evenly spaced ids); "
        "none given leaves the device alone", nargs="+"))
    prefill_tp_size: tuple[int, ...] = field(default=(), metadata=flag(
        "tensor-parallel ranks of each prefill instance, reused cyclically (default: from --gpu-ids, else 1)",
        type=int, nargs="+"))
    decode_tp_size: tuple[int, ...] = field(default=(), metadata=flag(
        "tensor-parallel ranks of each decode instance, reused cyclically (default: from --gpu-ids, else 1)",
        type=int, nargs="+"))

    def __post_init__(self) -> None:
        pd_default = 0 if self.num_colocated else 1
        for name in ("num_prefill", "num_decode"):  # resolved once: readers see ints
            if getattr(self, name) is None:
                object.__setattr__(self, name, pd_default)
        if self.num_colocated and (self.num_prefill or self.num_decode):
            raise ValueError("colocated instances cannot be mixed with prefill/decode ones")
        if not self.num_colocated and not (self.num_prefill and self.num_decode):
            raise ValueError("need at least one prefill and one decode instance "
                             "(or --num-colocated N)")

    @property
    def connect_host(self) -> str:
        # A wildcard bind address is not something to connect to.
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen
    log_path: Path | None = None
    log_file: IO[bytes] | None = field(default=None, repr=False)
    last_stderr_line: str = ""  # without a log file: the child's stderr passes through here
    relay: threading.Thread | None = field(default=None, repr=False)

    def log_tail(self, num_chars: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def reason(self) -> str:
        """The child's last words: the last non-empty line it wrote."""
        if self.relay is not None:
            self.relay.join(timeout=2.0)  # its pipe closes when the child is gone
            return self.last_stderr_line
        lines = [line.strip() for line in self.log_tail().splitlines() if line.strip()]
        return lines[-1] if lines else ""


def _relay_stderr(child: Child) -> None:
    """Copy the child's stderr to ours line by line, remembering the last one."""
    assert child.process.stderr is not None
    for raw in child.process.stderr:
        text = raw.decode(errors="replace")
        sys.stderr.write(text)
        sys.stderr.flush()
        if text.strip():
            child.last_stderr_line = text.strip()


def _pdserve_command(subcommand: str) -> list[str]:
    return [sys.executable, "-m", "pdserve.cli", subcommand]


def _check_port_free(host: str, port: int, flag_name: str) -> None:
    try:
        check_port_free(host, port, flag_name)
    except StartupError as exc:
        raise ClusterError(str(exc)) from None


def _signal_group(child: Child, sig: signal.Signals) -> None:
    try:
        os.killpg(child.process.pid, sig)  # the child leads its own group
    except (ProcessLookupError, PermissionError):
        pass


class Cluster:
    """Bootstrap + instances + router as child processes; a context manager."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self._lifeline: tuple[int, int] | None = None  # (read end for children, write end kept here)
        self._spawner: ThreadPoolExecutor | None = None  # the one thread that starts children
        self._roles = ([Role.PREFILL] * config.num_prefill + [Role.DECODE] * config.num_decode
                       + [Role.COLOCATED] * config.num_colocated)

    @property
    def router_url(self) -> str:
        return f"http://{self.config.connect_host}:{self.config.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. for ``openai.OpenAI(base_url=...)``."""
        return self.router_url + "/v1"

    @property
    def bootstrap_url(self) -> str:
        return f"http://{self.config.connect_host}:{self.config.bootstrap_port}"

    def instance_urls(self, role: Role) -> list[str]:
        """URLs of the instances of ``role``."""
        host, base = self.config.connect_host, self.config.base_port
        return [f"http://{host}:{base + i}" for i, r in enumerate(self._roles) if r == role]

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, stop_event: threading.Event | None = None) -> None:
        """Start everything and wait until the router and every instance are healthy; raises ClusterError."""
        cfg = self.config
        ports = [cfg.bootstrap_port, cfg.port] + [cfg.base_port + i for i in range(len(self._roles))]
        if len(set(ports)) != len(ports):
            raise ClusterError(f"the router ({cfg.port}), bootstrap ({cfg.bootstrap_port}) and instance ports "
                               f"(from {cfg.base_port}) overlap; choose --port/--bootstrap-port/--base-port apart")
        flags = ["--bootstrap-port", "--port"] + ["--base-port"] * len(self._roles)
        for port, flag_name in zip(ports, flags, strict=True):
            _check_port_free(cfg.host, port, flag_name)
        self._check_model()
        deadline = time.monotonic() + cfg.startup_timeout_s
        self._lifeline = os.pipe()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-spawner")
        try:
            self._spawn("bootstrap", _pdserve_command("bootstrap") + [
                "--host", cfg.host, "--port", str(cfg.bootstrap_port)])
            self._wait_healthy(self.bootstrap_url, deadline, stop_event)
            for i, role in enumerate(self._roles):
                index = self._roles[:i].count(role)
                self._spawn(f"{role}-{index}", self._serve_argv(role, cfg.base_port + i, index))
            self._spawn("router", self._router_argv())
            self._wait_healthy(self.router_url, deadline, stop_event)
            # The router is healthy once each role has one healthy worker; the
            # cluster is up when every instance is, so none of them starts out
            # refusing what is sent to it directly.
            for role in dict.fromkeys(self._roles):
                for url in self.instance_urls(role):
                    self._wait_healthy(url, deadline, stop_event)
        except BaseException:
            self.stop()
            raise

    def _check_model(self) -> None:
        """Every instance's ``--model-path`` exists, before any child starts (pdserve serve only)."""
        if self.config.serve_command or not self._roles:
            return  # another serve command may take other model names
        from pdserve.serve import check_model_path

        try:
            check_model_path(self.config.model_path)
        except StartupError as exc:
            raise ClusterError(str(exc)) from None

    def _serve_argv(self, role: Role, port: int, index: int = 0) -> list[str]:
        cfg = self.config
        command = list(cfg.serve_command) if cfg.serve_command else _pdserve_command("serve")
        return command + [
            "--model-path", cfg.model_path, "--host", cfg.host, "--port", str(port),
            "--disaggregation-mode", Role(role).value, "--disaggregation-bootstrap-url", self.bootstrap_url,
            "--disaggregation-transfer-backend", cfg.transfer_backend, *self._gpu_args(port, role, index),
            *cfg.serve_args]

    def _gpu_args(self, port: int, role: Role = Role.COLOCATED, index: int = 0) -> list[str]:
        """``--base-gpu-id``/``--gpu-id-step``/``--tp-size`` of one instance."""
        cfg = self.config
        sizes = {Role.PREFILL: cfg.prefill_tp_size, Role.DECODE: cfg.decode_tp_size}.get(Role(role), ())
        tp = sizes[index % len(sizes)] if sizes else None
        if not cfg.gpu_ids:
            return ["--tp-size", str(tp)] if tp else []
        group = [int(g) for g in cfg.gpu_ids[(port - cfg.base_port) % len(cfg.gpu_ids)].split(",")]
        steps = {b - a for a, b in zip(group, group[1:])}
        if len(steps) > 1 or (steps and min(steps) < 1) or (tp and tp != len(group)):
            raise ClusterError(f"GPUs {group} are not {tp or len(group)} evenly spaced ascending ids")
        args = ["--base-gpu-id", str(group[0])]
        if len(group) > 1:
            args += ["--gpu-id-step", str(steps.pop()), "--tp-size", str(len(group))]
        return args

    def _router_argv(self) -> list[str]:
        cfg = self.config
        argv = _pdserve_command("router") + [
            "--host", cfg.host, "--port", str(cfg.port), "--policy", cfg.policy]
        if cfg.num_colocated:
            argv += ["--worker", *self.instance_urls(Role.COLOCATED)]
        else:
            argv += ["--prefill", *self.instance_urls(Role.PREFILL),
                     "--decode", *self.instance_urls(Role.DECODE)]
        return argv + list(cfg.router_args)

    def _spawn(self, name: str, argv: list[str]) -> Child:
        log_path, log_file = None, None
        if self.config.log_dir:
            log_path = Path(self.config.log_dir) / f"{name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = log_path.open("ab")
        assert self._lifeline is not None, "children are spawned by start()"
        lifeline = self._lifeline[0]
        environ = env.child_environ(self._secret_env() | {env.LIFELINE_FD.name: str(lifeline)},
                                    remove=(env.API_KEY.name, env.CLUSTER_SECRET.name))
        # Without a log file the child's stderr passes through a relay that keeps its last line.
        assert self._spawner is not None
        process = self._spawner.submit(
            subprocess.Popen, argv, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT if log_file else subprocess.PIPE,
            start_new_session=True, env=environ, pass_fds=(lifeline,), preexec_fn=die_with_parent()).result()
        child = Child(name, argv, process, log_path, log_file)
        if log_file is None:
            child.relay = threading.Thread(target=_relay_stderr, args=(child,), name=f"stderr-{name}", daemon=True)
            child.relay.start()
        self.children.append(child)
        return child

    def _secret_env(self) -> dict[str, str]:
        """What the children read their key and secret from (an instance that
        does not use one ignores it)."""
        found = {env.API_KEY.name: self.config.api_key, env.CLUSTER_SECRET.name: self.config.cluster_secret}
        return {name: value for name, value in found.items() if value}

    def headers(self) -> dict[str, str]:
        """What a client of the router presents."""
        return bearer_headers(self.config.api_key)
    def restart(self, name: str) -> Child:
        """Kill one child's group (SIGKILL, like a crash) and start it again with the
        same command line; the new process is a new incarnation of the instance."""
        old = next(c for c in self.children if c.name == name)
        _signal_group(old, signal.SIGKILL)
        old.process.wait()
        if old.log_file is not None:
            old.log_file.close()
        self.children.remove(old)
        return self._spawn(name, old.argv)

    def dead_child(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((c for c in self.children if c.process.poll() is not None), None)

    def _wait_healthy(self, url: str, deadline: float, stop_event: threading.Event | None) -> None:
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while True:
                dead = self.dead_child()
                if dead is not None:
                    raise ClusterError(self._death_message(dead))
                if stop_event is not None and stop_event.is_set():
                    raise ClusterError("interrupted before the cluster was up")
                try:
                    if http.get(url + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"{url} not healthy after {self.config.startup_timeout_s}s;"
                                       f" {self._unhealthy_instances(http)}")
                time.sleep(POLL_INTERVAL_S)

    def _unhealthy_instances(self, http: httpx.Client) -> str:
        bad = []
        for role in dict.fromkeys(self._roles):
            for url in self.instance_urls(role):
                try:
                    healthy = http.get(url + "/health").status_code == 200
                except httpx.HTTPError:
                    healthy = False
                if not healthy:
                    bad.append(f"{role} {url}")
        return f"not healthy: {', '.join(bad)}" if bad else "every instance is healthy"

    @staticmethod
    def _death_message(child: Child) -> str:
        """One line: who died, its exit code, its last line, and where its log is."""
        message = f"{child.name} exited with code {child.process.returncode}"
        reason = one_line(child.reason())
        if reason:
            message += f": {reason}"
        return f"{message} (log: {child.log_path})" if child.log_path else message

    def wait(self, stop_event: threading.Event) -> int:
        """Block until ``stop_event`` (0) or until a child dies (1)."""
        while not stop_event.wait(POLL_INTERVAL_S):
            dead = self.dead_child()
            if dead is not None:
                print(f"pdserve up: error: {self._death_message(dead)}", file=sys.stderr, flush=True)
                return 1
        return 0

    def stop(self) -> None:
        """SIGTERM every child's group, SIGKILL what is left after the grace period."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_grace_s
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            _signal_group(child, signal.SIGKILL)  # also whatever the child spawned
            child.process.wait()
            if child.relay is not None:
                child.relay.join(timeout=2.0)
            if child.process.stderr is not None:
                child.process.stderr.close()
            if child.log_file is not None:
                child.log_file.close()
        self.children.clear()
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None
        if self._spawner is not None:
            self._spawner.shutdown(wait=False)
            self._spawner = None


def _smoke(cluster: Cluster) -> int:
    """One completion through the router; prints the answer."""
    with httpx.Client(timeout=cluster.config.startup_timeout_s, trust_env=False,
                      headers=cluster.headers()) as http:
        models = http.get(cluster.base_url + "/models").json().get("data") or []
        model = models[0]["id"] if models else cluster.config.model_path
        body = {"model": model, "prompt": SMOKE_PROMPT, "max_tokens": 16, "temperature": 0}
        response = http.post(cluster.base_url + "/completions", json=body)
    if response.status_code != 200:
        print(f"smoke test failed ({response.status_code}): {response.text}", file=sys.stderr)
        return 1
    text = response.json()["choices"][0]["text"]
    print(f"smoke test: {SMOKE_PROMPT!r} -> {text!r}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve up", description="Start a whole local PD cluster: bootstrap, instances, router.",
                                     epilog="Arguments after -- go to every `pdserve serve`.")
    add_dataclass_args(parser, ClusterConfig, skip=("serve_args",),
                       choices={"transfer_backend": TRANSFER_BACKENDS.names(), "policy": POLICIES.names()})
    return parser


def parse_args(argv: list[str]) -> tuple[ClusterConfig, bool]:
    """Returns the config and whether ``--smoke`` was given."""
    serve_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, serve_args = argv[:at], argv[at + 1:]
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.serve_args = tuple(serve_args)
    try:
        config = config_from_args(ClusterConfig, ns)
        secret = read_secret(config.cluster_secret, config.cluster_secret_file, env.CLUSTER_SECRET,
                             "--cluster-secret")
        config = replace(config, api_key=config.api_key or env.API_KEY.get(), cluster_secret=secret)
    except ValueError as exc:
        flag_error(parser.prog, str(exc))
    return config, config.smoke


def main(argv: list[str]) -> int:
    config, smoke = parse_args(argv)
    stop_event = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_event.set())
    cluster = Cluster(config)
    try:
        cluster.start(stop_event)
        print(f"pdserve is up: OpenAI base URL {cluster.base_url}", flush=True)
        return _smoke(cluster) if smoke else cluster.wait(stop_event)
    except ClusterError as exc:
        print(f"pdserve up: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.stop()
