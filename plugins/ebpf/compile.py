"""Compile, load and pin the tc programs in a child process: ``python -m
meshagent.plugins.ebpf.compile PIN_DIR DEFINES_JSON``; prints ``{"replaced": [map, ...]}``.

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


def unpin_other_layouts(pin_dir: Path, defines: dict) -> list[str]:
    """Remove pinned maps whose layout is not this version's (bcc would reuse them as they
    are); programs still attached keep them alive until they are replaced."""
    from meshagent.plugins.ebpf.maps import MAP_NAMES, expected_layout, pinned_layout
    replaced = []
    for name in MAP_NAMES:
        found = pinned_layout(pin_dir / name)
        if found is not None and found != expected_layout(name, defines):
            (pin_dir / name).unlink()
            replaced.append(name)
    return replaced


def main() -> int:
    from meshagent.plugins.ebpf.loader import PROGRAMS, DatapathError, compile_programs
    pin_dir, defines = Path(sys.argv[1]), json.loads(sys.argv[2])
    try:
        replaced = unpin_other_layouts(pin_dir, defines)
        loaded = compile_programs(pin_dir, defines)
        for name in PROGRAMS:
            bpf, function = loaded[name]
            pin(function.fd, pin_dir / f"prog_{name}")
            pin(bpf["flow_events"].get_fd(), pin_dir / f"events_{name}")
    except (DatapathError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps({"replaced": replaced}), flush=True)
    return 0


if __name__ == "__main__":
    os._exit(main())  # skip bcc's atexit cleanup: the pins keep everything alive
