"""Start-up mistakes an operator fixes: one line on stderr, a non-zero exit, no traceback.

Every process role checks what it can before it loads anything (its ports, its
model path) and raises :class:`StartupError`; ``run_main`` turns that into
``pdserve <command>: error: <reason>`` and exit status 1.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_STARTUP_ERROR = 1


class StartupError(Exception):
    """A process cannot start for a reason its operator fixes; the message is one line."""


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, so a reason prints as one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raise StartupError naming ``flag`` when ``port`` on ``host`` cannot be bound.

    SO_REUSEADDR as the HTTP servers set it: a port in TIME_WAIT is free, one that
    something listens on is not.
    """
    if port == 0:
        return  # the system picks a free one
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(f"port {port} on {host} is not free ({exc.strerror or exc}); "
                               f"choose another with {flag}") from None


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def run_main(prog: str, main: Callable[[], int]) -> int:
    """``main()``, with a StartupError printed as one line on stderr and exit
    status 1, and a Ctrl-C (which the HTTP server re-raises once it has shut
    down) as one line and status 130 instead of a traceback."""
    try:
        return main()
    except StartupError as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_STARTUP_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def flag_error(prog: str, message: str) -> NoReturn:
    """Flags that parse but do not fit together: one line and exit status 2, as argparse's
    own errors, without the usage that would bury the line."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(2)
