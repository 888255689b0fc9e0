"""The ``pdserve`` console script: one subcommand per process role.

Each subcommand lives in its own module with a ``main(argv)`` entry point; the
module is imported only when its subcommand runs, so ``pdserve bench`` never
pays for importing torch.
"""

from __future__ import annotations

import importlib
import sys

from pdserve.web.lifeline import follow_launcher

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pdserve.serve", "serve one instance (prefill, decode or colocated)"),
    "bootstrap": ("pdserve.bootstrap.server", "run the bootstrap registry"),
    "router": ("pdserve.router.app", "run the PD load balancer / OpenAI front door"),
    "up": ("pdserve.launcher", "start a whole local cluster"),
    "bench": ("pdserve.benchmarks.bench_serving", "TTFT/ITL benchmark client"),
    "model": ("pdserve.model.builtin", "built-in models: pdserve model path NAME"),
    "check-env": ("pdserve.check_env", "versions, GPUs and a loopback self-test of each KV transfer backend"),
}


def _usage() -> str:
    lines = ["usage: pdserve <command> [options]", "       pdserve --version", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
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
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
