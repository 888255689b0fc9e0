"""``pdserve serve``: parse the instance's flags, resolve its model, run its front.

It sits at the package root because it assembles the parts: the front
(``server/``) is handed the engine's entry point (``engine/``) with the role
``--disaggregation-mode`` names (``ROLES``: ``engine/``, ``prefill/``,
``decode/``), and the flags' choices come from the registries of attention and
transfer backends.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from pdserve.common.args import add_dataclass_args, config_from_args
from pdserve.common.config import ServerConfig
from pdserve.common.registry import Registry
from pdserve.common.roles import Role
from pdserve.common.startup import StartupError, check_port_free, flag_error, run_main

if TYPE_CHECKING:
    from pdserve.engine.role import EngineRole

# The engine's role class for each ``Role``; lazy, so a colocated instance
# never imports the PD roles (nor their transfer backends).
ROLES: Registry[type[EngineRole]] = Registry("disaggregation mode", {
    Role.COLOCATED: "pdserve.engine.role:ColocatedRole",
    Role.PREFILL: "pdserve.prefill.role:PrefillRole",
    Role.DECODE: "pdserve.decode.role:DecodeRole",
})


def flag_choices() -> dict[str, tuple[str, ...]]:
    """``choices`` of the flags whose values name registry entries (``--disaggregation-mode``
    takes the ``Role`` names, ``ROLES``' keys)."""
    from pdserve.model.attention.base import ATTENTION_BACKENDS
    from pdserve.transfer.base import TRANSFER_BACKENDS

    return {
        "attention_backend": ATTENTION_BACKENDS.names(),
        "disaggregation_transfer_backend": TRANSFER_BACKENDS.names(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve serve", description="Serve one pdserve instance: prefill, decode or colocated.")
    add_dataclass_args(parser, ServerConfig, choices=flag_choices())
    return parser


def parse_config(argv: list[str]) -> ServerConfig:
    parser = build_parser()
    cfg = config_from_args(ServerConfig, parser.parse_args(argv))
    try:
        cfg = cfg.resolve()  # reads the secret's file
        cfg.validate()
    except ValueError as exc:
        flag_error(parser.prog, str(exc))
    return cfg


def resolve_model_dir(model_path: str | None) -> str:
    """An HF directory for a directory, a built-in preset name, or a ``config.json`` of real shapes."""
    from pdserve.model.builtin import config_dir_for, resolve_model_path

    if model_path and model_path.endswith(".json") and os.path.isfile(model_path):
        return config_dir_for(model_path)
    return resolve_model_path(model_path)


def check_model_path(model_path: str | None) -> str:
    """The model directory of ``--model-path``; StartupError, one line, when there is none."""
    try:
        model_dir = resolve_model_dir(model_path)
    except (ValueError, OSError) as exc:
        raise StartupError(f"--model-path: {exc}") from None
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise StartupError(f"--model-path: {model_dir!r} has no config.json; "
                           "give a Hugging Face model directory, a built-in preset or a config .json file")
    return model_dir


def check_ports(cfg: ServerConfig) -> None:
    """The HTTP port and a fixed PD control port are free, checked before the model loads."""
    check_port_free(cfg.host, cfg.port, "--port")
    if cfg.disaggregation_control_port:
        check_port_free(cfg.disaggregation_control_host or cfg.host, cfg.disaggregation_control_port,
                        "--disaggregation-control-port")


def _serve(cfg: ServerConfig) -> int:
    check_ports(cfg)
    model_dir = check_model_path(cfg.model_path)
    logging.basicConfig(level=cfg.log_level.upper(), format=f"[%(asctime)s {cfg.disaggregation_mode}] %(message)s")
    from pdserve.server.app import run

    return run(cfg, model_dir, engine_main)


def engine_main(cfg: ServerConfig, model_dir: str, conn: Connection, num_text_tokens: int | None = None,
                rank: int = 0, links: tuple = ()) -> None:
    """The engine process's entry point (every rank's), with its role's class."""
    from pdserve.engine.engine import engine_main as run_engine

    run_engine(cfg, model_dir, conn, num_text_tokens, rank, links, role=ROLES.get(cfg.disaggregation_mode))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(list(sys.argv[1:] if argv is None else argv))
    return run_main("pdserve serve", lambda: _serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
