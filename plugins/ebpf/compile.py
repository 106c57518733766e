"""Compile, load and pin the tc programs in a child process: ``python -m
meshagent.plugins.ebpf.compile PIN_DIR DEFINES_JSON [CACHE_DIR]``; prints
``{"replaced": [map, ...], "cache_error": "..."}``.

bcc compiles with an in-process LLVM that peaks at some 150 MiB; doing it in a short-lived child
keeps that out of the agent, which then opens the pinned programs and event arrays by path.
Given a CACHE_DIR, the child also stores what it compiled there (see ``progcache``), under the
key of the very sources it compiled.
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
    from meshagent.plugins.ebpf import progcache
    from meshagent.plugins.ebpf.loader import (
        PROGRAMS,
        DatapathError,
        compile_programs,
        compiler_flags,
        program_sources,
        unpin_other_layouts,
    )
    pin_dir, defines = Path(sys.argv[1]), json.loads(sys.argv[2])
    cache_dir = Path(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None
    try:
        replaced = unpin_other_layouts(pin_dir, defines)
        sources = program_sources()
        loaded = compile_programs(pin_dir, defines, sources)
        for name in PROGRAMS:
            bpf, function = loaded[name]
            pin(function.fd, pin_dir / f"prog_{name}")
            pin(bpf["flow_events"].get_fd(), pin_dir / f"events_{name}")
    except (DatapathError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    cache_error = ""
    if cache_dir is not None:
        try:
            progcache.store(cache_dir, progcache.cache_key(
                sources, compiler_flags(pin_dir, defines)), progcache.record(loaded))
        except (progcache.CacheError, OSError) as exc:
            cache_error = str(exc)
    print(json.dumps({"replaced": replaced, "cache_error": cache_error}), flush=True)
    return 0


if __name__ == "__main__":
    os._exit(main())  # skip bcc's atexit cleanup: the pins keep everything alive
