"""`python -m app.child_guard PARENT_PID PROGRAM ARGS...`: run PROGRAM so that it dies
with its parent.

Linux sends a process its parent-death signal when the parent goes, however it
goes (SIGKILL, the OOM killer). Setting it in `preexec_fn` is unsafe in a
threaded parent, so this small program sets it on itself and then becomes
PROGRAM (the setting survives exec). Elsewhere it only execs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def guarded(argv: list[str]) -> list[str]:
    """`argv` run through this guard, so it dies with the calling process."""
    return [sys.executable, "-m", "app.child_guard", str(os.getpid()), *argv]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m app.child_guard PARENT_PID PROGRAM [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    parent, argv = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            raise SystemExit(1)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"cannot run {argv[0]}: {exc}", file=sys.stderr)
        raise SystemExit(127) from None


if __name__ == "__main__":
    main(sys.argv[1:])
