"""The ``pdserve`` console script: one subcommand per process role.

Each subcommand lives in its own module with a ``main(argv)`` entry point; the
module is imported only when its subcommand runs, so ``pdserve bench`` never
pays for importing torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pdserve.common.registry import Registry, load
from pdserve.web.lifeline import follow_launcher


@dataclass(frozen=True)
class Command:
    """A subcommand: its ``main(argv)`` as a lazy ``"module:function"`` name, and what it does."""

    main: str
    help: str

    def run(self, argv: list[str]) -> int:
        return int(load(self.main)(argv) or 0)


SUBCOMMANDS: Registry[Command] = Registry("command", {
    "serve": Command("pdserve.serve:main", "serve one instance (prefill, decode or colocated)"),
    "bootstrap": Command("pdserve.bootstrap.server:main", "run the bootstrap registry"),
    "router": Command("pdserve.router.app:main", "run the PD load balancer / OpenAI front door"),
    "up": Command("pdserve.launcher:main", "start a whole local cluster"),
    "bench": Command("pdserve.benchmarks.bench_serving:main", "TTFT/ITL benchmark client"),
    "model": Command("pdserve.model.builtin:main", "built-in models: pdserve model path NAME"),
    "check-env": Command("pdserve.check_env:main",
                         "versions, GPUs and a loopback self-test of each KV transfer backend"),
})


def _usage() -> str:
    lines = ["usage: pdserve <command> [options]", "       pdserve --version", "", "commands:"]
    lines += [f"  {name:<10} {SUBCOMMANDS.get(name).help}" for name in SUBCOMMANDS.names()]
    lines += ["", "pdserve <command> --help describes a command's flags."]
    return "\n".join(lines)


def _version() -> str:
    from pdserve.common.version import __version__

    return f"pdserve {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"pdserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    follow_launcher()  # a child of `pdserve up` ends with it, however it ends
    return SUBCOMMANDS.get(name).run(rest)


if __name__ == "__main__":
    sys.exit(main())
