"""Compile, load and pin the tc programs in a child process: ``python -m
meshagent.plugins.ebpf.compile PIN_DIR DEFINES_JSON``.

bcc compiles with an in-process LLVM that peaks at some 150 MiB; doing it in a short-lived child
keeps that out of the agent, which then opens the pinned programs and event arrays by path.
"""

import json
import os
import sys
from pathlib import Path


def pin(fd: int, path: Path) -> None:
    from bcc.libbcc import lib
    path.unlink(missing_ok=True)
    if lib.bpf_obj_pin(fd, str(path).encode()) != 0:
        raise OSError(f"pinning {path} failed")


def main() -> int:
    from meshagent.plugins.ebpf.loader import PROGRAMS, DatapathError, compile_programs
    pin_dir, defines = Path(sys.argv[1]), json.loads(sys.argv[2])
    try:
        loaded = compile_programs(pin_dir, defines)
        for name in PROGRAMS:
            bpf, function = loaded[name]
            pin(function.fd, pin_dir / f"prog_{name}")
            pin(bpf["drop_events"].get_fd(), pin_dir / f"events_{name}")
    except (DatapathError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os._exit(main())  # skip bcc's atexit cleanup: the pins keep everything alive
