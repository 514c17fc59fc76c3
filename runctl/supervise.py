"""Run one command and keep its exit code in a file.

``dgs-run start`` launches the receivers and exits; a later ``dgs-run stop`` in
another process must still learn how each receiver ended, and a process can
only collect the exit status of its own children. So every receiver runs under
this small parent, which forwards SIGTERM / SIGINT / SIGHUP to it and, when it
ends, writes its exit code (negative: killed by that signal) to the exit file.
The file is written whole or not at all (rename), so a reader never sees half.

    python -m runctl.supervise --exit-file FILE -- COMMAND [ARG ...]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: What the command line of a supervisor contains (checked before signalling a pid).
MARKER = "runctl.supervise"


def write_exit_file(path: Path, code: int) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"{code}\n")
    os.replace(partial, path)


def read_exit_file(path: Path) -> int | None:
    """The code a supervisor wrote, or None while its command runs."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runctl.supervise")
    parser.add_argument("--exit-file", required=True, type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    try:
        child = subprocess.Popen(command)
    except OSError as error:
        print(f"supervise: cannot start {command[0]}: {error}", file=sys.stderr)
        write_exit_file(args.exit_file, 127)
        return 127
    for sig in FORWARDED:
        signal.signal(sig, lambda number, _frame: child.send_signal(number))
    code = child.wait()
    write_exit_file(args.exit_file, code)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
