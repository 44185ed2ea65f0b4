"""The console scripts' entry points (``dm_status`` and the others start here).

Loading daman takes a moment (about 0.1 s): this module loads it inside a guard, so that
Ctrl-C meanwhile ends as it does once the command runs (``dm_status: interrupted``, exit
code 130), never with a traceback. It lives outside the ``daman`` package because importing
anything inside it runs ``daman/__init__.py``, which loads most of daman, before any guard.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold SIGINT back while daman loads and deliver it after, where it is caught.

    Python's import machinery runs weakref callbacks, and a KeyboardInterrupt raised in one
    is printed ("Exception ignored in ... cb") and dropped: the command would go on.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:  # a Ctrl-C held meanwhile is raised by this call
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _main(name: str) -> int:
    try:
        with _ctrl_c_held():
            from daman import cli

        code = getattr(cli, f"{name}_main")()
    except KeyboardInterrupt:
        if sys.stderr is not None:
            # The wording of daman.report.interrupted_line, which may not be loaded yet.
            print(f"dm_{name}: interrupted", file=sys.stderr)
        code = 130
    # The command is over: a Ctrl-C now has nothing left to stop, and would only print
    # "Exception ignored ... KeyboardInterrupt" from the interpreter's shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def aws_main() -> int:
    return _main("aws")


def configure_main() -> int:
    return _main("configure")


def pull_main() -> int:
    return _main("pull")


def delete_main() -> int:
    return _main("delete")


def history_main() -> int:
    return _main("history")


def restore_main() -> int:
    return _main("restore")


def push_main() -> int:
    return _main("push")


def ls_main() -> int:
    return _main("ls")


def info_main() -> int:
    return _main("info")


def status_main() -> int:
    return _main("status")


def persist_main() -> int:
    return _main("persist")


def clear_main() -> int:
    return _main("clear")


def verify_main() -> int:
    return _main("verify")


def migrate_main() -> int:
    return _main("migrate")
