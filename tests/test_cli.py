"""The first five minutes: every --help explains itself, start-up mistakes are one line.

Each mistake runs as a real ``pdserve`` subprocess: it must exit non-zero with one
clear line on stderr (the last line, where children or the model printed
before it), and never a traceback.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pdserve import __version__
from pdserve.tests.support.ports import free_port, free_port_block, listening_port
from pdserve.tests.support.waiting import wait_until

RUN_TIMEOUT_S = 120.0
RST = re.compile(r"``|:[a-z]+:`")


def _parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    from pdserve import check_env, launcher, serve
    from pdserve.benchmarks import bench_serving
    from pdserve.bootstrap import server as bootstrap_server
    from pdserve.model import builtin
    from pdserve.router import app as router_app

    return {"serve": serve.build_parser, "bootstrap": bootstrap_server.build_parser, "router": router_app.build_parser,
            "up": launcher.build_parser, "bench": bench_serving.build_parser, "check-env": check_env.build_parser,
            "model": builtin.build_parser}


def test_every_subcommand_has_a_parser_here() -> None:
    from pdserve.cli import SUBCOMMANDS

    assert set(_parsers()) == set(SUBCOMMANDS)


def test_config_dataclasses_give_role_flags_positionals_and_subcommands() -> None:
    from pdserve.common.args import chosen_subcommand
    from pdserve.common.roles import Role
    from pdserve.model import builtin
    from pdserve.serve import parse_config

    assert parse_config([]).disaggregation_mode is Role.COLOCATED
    pd = parse_config(["--disaggregation-mode", "decode", "--disaggregation-bootstrap-url", "http://127.0.0.1:1"])
    assert pd.disaggregation_mode is Role.DECODE and pd.instance_id.startswith("decode-")
    command, cfg = chosen_subcommand(builtin.COMMANDS, builtin.build_parser().parse_args(["path", "tiny"]))
    assert cfg == builtin.ModelPathConfig(name="tiny") and command is builtin.COMMANDS.get("path")
    with pytest.raises(SystemExit):
        builtin.build_parser().parse_args(["path"])  # NAME is required


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_help_describes_every_flag_with_its_default_once(name: str) -> None:
    parser = _parsers()[name]()
    assert parser.prog == f"pdserve {name}"
    assert parser.description and not RST.search(parser.description), parser.description
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        flag_names = "/".join(action.option_strings) or action.dest
        if not text.strip():
            problems.append(f"{flag_names}: no help")
        if action.option_strings and text.lower().count("default") != 1:  # positionals have none
            problems.append(f"{flag_names}: the default is said {text.lower().count('default')} times: {text!r}")
        if RST.search(text):
            problems.append(f"{flag_names}: reStructuredText in {text!r}")
    assert problems == []
    rendered = parser.format_help()
    assert not RST.search(rendered)
    assert "(default: None)" not in rendered  # nothing reads as a Python value


def test_help_of_each_subcommand_runs_from_the_console_script() -> None:
    for name in _parsers():
        done = subprocess.run([sys.executable, "-m", "pdserve.cli", name, "--help"], capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: pdserve {name}"), done.stdout[:200]


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "--version"], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0
    assert done.stdout.strip() == f"pdserve {__version__}"


# ----- start-up mistakes -----


def _run(*args: str, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)


def assert_one_line_error(done: subprocess.CompletedProcess[str], prog: str, *needles: str,
                          only_line: bool = True) -> str:
    """Non-zero exit, no traceback, and ``prog: error: ...`` naming every needle as the
    last line of stderr (the only one when ``only_line``)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert lines, "nothing on stderr"
    if only_line:
        assert len(lines) == 1, done.stderr[-3000:]
    last = lines[-1]
    assert last.startswith(f"{prog}: error: "), last
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something listens on."""
    with listening_port() as port:
        yield port


@pytest.mark.parametrize("command", ["serve", "up"])
def test_missing_model_path(command: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    ports = _up_ports() if command == "up" else ("--port", str(free_port()))
    done = _run(command, "--model-path", missing, *ports)
    assert_one_line_error(done, f"pdserve {command}", "--model-path", missing)


@pytest.mark.parametrize("command", ["serve", "up"])
def test_model_dir_without_config_json(command: str, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    ports = _up_ports() if command == "up" else ("--port", str(free_port()))
    done = _run(command, "--model-path", str(tmp_path), *ports)
    assert_one_line_error(done, f"pdserve {command}", "--model-path", str(tmp_path), "config.json")


def _up_ports(first: int | None = None) -> tuple[str, ...]:
    first = first or free_port_block(5)
    return ("--port", str(first), "--bootstrap-port", str(first + 1), "--base-port", str(first + 2))


@pytest.mark.parametrize("command", ["serve", "router", "bootstrap"])
def test_busy_port_names_the_flag(command: str, busy_port: int, tmp_path: Path) -> None:
    # A model path that does not exist: the port is checked first, before any model.
    extra = ("--model-path", str(tmp_path / "absent")) if command == "serve" else ()
    done = _run(command, "--port", str(busy_port), *extra)
    assert_one_line_error(done, f"pdserve {command}", f"port {busy_port}", "--port")


def test_busy_control_port_names_its_flag(busy_port: int, tmp_path: Path) -> None:
    done = _run("serve", "--port", str(free_port()), "--disaggregation-control-port", str(busy_port),
                "--model-path", str(tmp_path / "absent"))
    assert_one_line_error(done, "pdserve serve", f"port {busy_port}", "--disaggregation-control-port")


@pytest.mark.parametrize("flag_name", ["--port", "--bootstrap-port", "--base-port"])
def test_up_busy_port_names_the_flag(flag_name: str) -> None:
    first = free_port_block(5)
    index = {"--port": 0, "--bootstrap-port": 1, "--base-port": 2}[flag_name]
    with listening_port(first + index):
        done = _run("up", *_up_ports(first))
    assert_one_line_error(done, "pdserve up", f"port {first + index}", flag_name)


def test_flags_that_do_not_fit_together_are_one_line() -> None:
    done = _run("router", "--worker", "http://127.0.0.1:1", "--prefill", "http://127.0.0.1:2")
    assert done.returncode == 2
    assert_one_line_error(done, "pdserve router", "--worker")
    done = _run("bench", "--base-url", "http://127.0.0.1:30000/v1/")
    assert done.returncode == 2
    assert_one_line_error(done, "pdserve bench", "/v1", "drop", "http://127.0.0.1:30000")


def test_up_repeats_the_reason_of_a_child_that_fails_at_start() -> None:
    # Every instance refuses its flags; bootstrap and router start and are stopped again.
    done = _run("up", *_up_ports(), "--startup-timeout-s", "100", "--", "--page-size", "0")
    last = assert_one_line_error(done, "pdserve up", "exited with code 2", "--page-size must be >= 1",
                                 only_line=False)
    assert re.search(r"(prefill|decode)-0 exited", last), last


def test_layout_mismatch_is_one_line_naming_both_values(tmp_path: Path) -> None:
    """A decode instance whose page size differs from the live prefill instance's."""
    bootstrap_port, prefill_port = free_port(), free_port()
    bootstrap_url = f"http://127.0.0.1:{bootstrap_port}"
    common = ("--skip-server-warmup", "--max-total-tokens", "1024", "--disaggregation-bootstrap-url", bootstrap_url)
    children = []
    try:
        children.append(_spawn(tmp_path / "bootstrap.log", "bootstrap", "--port", str(bootstrap_port)))
        children.append(_spawn(tmp_path / "prefill.log", "serve", "--port", str(prefill_port), *common,
                               "--disaggregation-mode", "prefill", "--page-size", "4"))
        _wait_registered(bootstrap_url, children, tmp_path)
        done = _run("serve", "--port", str(free_port()), *common, "--disaggregation-mode", "decode",
                    "--page-size", "8")
    finally:
        for child in children:
            child.terminate()
            child.wait(timeout=30)
    last = assert_one_line_error(done, "pdserve serve", "page_size", only_line=False)
    assert re.search(r"page_size: decode '[^']+'=8 vs prefill '[^']+'=4", last), last


def _spawn(log_path: Path, *args: str) -> subprocess.Popen:
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "pdserve.cli", *args], stdout=log, stderr=subprocess.STDOUT)


def _wait_registered(bootstrap_url: str, children: list[subprocess.Popen], logs: Path) -> None:
    def prefill_registered() -> bool:
        assert all(c.poll() is None for c in children), [p.read_text()[-2000:] for p in logs.glob("*.log")]
        try:
            return len(httpx.get(bootstrap_url + "/instances", timeout=2, trust_env=False).json()) == 1
        except httpx.HTTPError:
            return False

    wait_until(prefill_registered, RUN_TIMEOUT_S, 0.2, "the prefill instance never registered")


def test_unreachable_bootstrap_service_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = _run("serve", "--port", str(free_port()), "--skip-server-warmup", "--max-total-tokens", "1024",
                "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-url", url)
    assert_one_line_error(done, "pdserve serve", f"cannot reach the bootstrap service at {url}",
                          "--disaggregation-bootstrap-url", only_line=False)
