"""Compiling, loading and attaching meshagent's tc programs (bcc + pyroute2).

bcc rewrites map accesses only in the main source file, so each attach-point file is handed to
it with its ``#include "lib/..."`` lines expanded in place. The two programs share every map by
pinning them under ``<bpf-root>/meshagent``.
"""

import json
import logging
import os
import re
from pathlib import Path
from typing import Protocol

import attrs

from meshagent.plugin import MeshagentError

log = logging.getLogger(__name__)

PROGRAMS = ("from_container", "to_container")  # tc ingress, tc egress of the host veth
PARENTS = {"from_container": "ffff:fff2", "to_container": "ffff:fff3"}
ETH_P_ALL = 0x0003
BPF_FS_TYPE = "bpf"


class DatapathError(MeshagentError):
    """The eBPF datapath cannot run here: the message says why and what to do."""


def bpf_source_dir() -> Path:
    """The C sources: ``bpf/`` of a source checkout (editable install), or the copy a wheel
    ships as ``meshagent/plugins/ebpf/bpf``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "bpf", here.parents[1] / "bpf"):
        if (candidate / "from_container.c").exists():
            return candidate
    raise DatapathError(f"the eBPF C sources are missing (looked in {here / 'bpf'} and"
                        f" {here.parents[1] / 'bpf'})")


def expand_includes(path: Path, root: Path, seen: set[Path] | None = None) -> str:
    seen = set() if seen is None else seen
    out = []
    for line in path.read_text().splitlines(keepends=True):
        match = re.match(r'\s*#include "(.+)"', line)
        if match:
            target = (root / match.group(1)).resolve()
            if target not in seen:
                seen.add(target)
                out.append(expand_includes(target, root, seen))
            continue
        out.append(line)
    return "".join(out)


def is_bpffs(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target and line.split()[2] == BPF_FS_TYPE
                   for line in mounts)


def ensure_bpffs(root: Path) -> None:
    """Mount bpffs at ``root`` unless it is one already."""
    if is_bpffs(root):
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatapathError(f"--ebpf-bpf-root {root} is unusable ({exc.strerror}): give a"
                            " directory where bpffs is (or can be) mounted") from None
    result = os.system(f"mount -t bpf -o mode=0700 bpf {root} 2>/dev/null")
    if result != 0 or not is_bpffs(root):
        raise DatapathError(f"{root} is not a bpffs and mounting one failed: run"
                            f" 'mount -t bpf bpf {root}' as root, or pass --bpf-root to a bpffs")


def program_sources() -> dict[str, str]:
    """``{program name: its C source with the lib/ includes expanded}``."""
    root = bpf_source_dir()
    return {name: expand_includes(root / f"{name}.c", root) for name in PROGRAMS}


def compiler_flags(pin_dir: Path, defines: dict) -> list[str]:
    flags = [f'-DPIN_DIR="{pin_dir}"', "-Wno-unused-function", "-Wno-macro-redefined"]
    return flags + [f"-D{name}={value}" for name, value in defines.items()]


def compile_programs(pin_dir: Path, defines: dict[str, int],
                     sources: dict[str, str] | None = None) -> dict[str, tuple]:
    """``{program name: (BPF object, loaded function)}``; DatapathError says what went wrong."""
    try:
        from bcc import BPF
    except ImportError:
        raise DatapathError("bcc is not installed: apt-get install python3-bpfcc (and use a"
                            " venv with --system-site-packages)") from None
    release = os.uname().release
    if not Path(f"/lib/modules/{release}/build").exists():
        raise DatapathError(f"no kernel headers for {release}: install linux-headers-amd64 and"
                            f" link /lib/modules/{release}/build (make setup does)")
    sources = sources or program_sources()
    cflags = compiler_flags(pin_dir, defines)
    loaded = {}
    for name in PROGRAMS:
        try:
            bpf = BPF(text=sources[name], cflags=cflags)
            function = bpf.load_func(name, BPF.SCHED_CLS)
        except Exception as exc:  # bcc raises plain Exception for compile and verifier errors
            detail = str(exc)
            if "Operation not permitted" in detail or "EPERM" in detail:
                raise DatapathError(f"loading {name} was refused: run the agent as root (needs"
                                    " CAP_BPF and CAP_NET_ADMIN)") from None
            raise DatapathError(f"compiling/loading {name} failed (kernel verifier or"
                                f" compiler): {detail}") from None
        loaded[name] = (bpf, function)
    return loaded


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


@attrs.frozen
class Loaded:
    """What loading the programs did: pinned maps of another layout it started afresh, and
    whether the programs came from the program cache (no compiler run)."""

    replaced: list[str]
    cached: bool


async def load_programs(pin_dir: Path, defines: dict, cache_dir: Path | None) -> Loaded:
    """Load and pin the programs: from the program cache when it holds them (see
    :mod:`meshagent.plugins.ebpf.progcache`), else compiled in a child that fills it."""
    import asyncio

    from meshagent.plugins.ebpf import progcache
    if cache_dir is not None:
        key = progcache.cache_key(program_sources(), compiler_flags(pin_dir, defines))
        entry = progcache.lookup(cache_dir, key)
        if entry is not None:
            try:
                replaced = await asyncio.to_thread(_load_cached, entry, pin_dir, defines)
                return Loaded(replaced, cached=True)
            except progcache.CacheError as exc:
                log.warning("the cached eBPF programs could not be loaded (%s): compiling", exc)
    return Loaded(await compile_in_child(pin_dir, defines, cache_dir), cached=False)


def _load_cached(entry: dict, pin_dir: Path, defines: dict) -> list[str]:
    from meshagent.plugins.ebpf import progcache
    replaced = unpin_other_layouts(pin_dir, defines)
    progcache.load(entry, pin_dir)
    return replaced


async def compile_in_child(pin_dir: Path, defines: dict, cache_dir: Path | None = None
                           ) -> list[str]:
    """Compile and pin the programs in a child process (keeps LLVM's peak out of the agent),
    which stores them in ``cache_dir`` if given; the names of pinned maps of another layout
    it had to start afresh."""
    import asyncio
    import sys
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshagent.plugins.ebpf.compile", str(pin_dir),
        json.dumps(defines), str(cache_dir or ""), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await child.communicate()
    if child.returncode != 0:
        message = err.decode().strip().splitlines()
        raise DatapathError(message[-1] if message else f"compiling the programs failed"
                                                        f" (exit {child.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    if result.get("cache_error"):
        log.warning("the compiled eBPF programs were not cached: %s", result["cache_error"])
    return result["replaced"]


class PinnedProgram:
    """A loaded program opened by its pin: what tc attaches."""

    def __init__(self, pin_dir: Path, name: str):
        from meshagent.plugins.ebpf.maps import bpf_lib
        lib = bpf_lib()
        self.name = name
        self.fd = lib.bpf_obj_get(str(pin_dir / f"prog_{name}").encode())
        if self.fd < 0:
            raise DatapathError(f"cannot open the pinned program {pin_dir / f'prog_{name}'}")

    def close(self) -> None:
        os.close(self.fd)


class Attacher(Protocol):
    """Puts the programs on an endpoint's veth, and tells what is there."""

    def attach(self, ifindex: int, programs: dict[str, "PinnedProgram"]) -> None: ...

    def attached(self, ifindex: int) -> list[str]: ...


class TcAttacher:
    """The real one: clsact and direct-action filters on the host-side veth (pyroute2)."""

    def attach(self, ifindex: int, programs: dict[str, "PinnedProgram"]) -> None:
        """Attach (or atomically replace) both programs on one veth."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST: already there
                    raise
            for name, program in programs.items():
                ipr.tc("replace-filter", "bpf", ifindex, ":1", fd=program.fd,
                       name=program.name, parent=PARENTS[name], classid=1,
                       direct_action=True, prio=1, protocol=ETH_P_ALL)

    def attached(self, ifindex: int) -> list[str]:
        """Names of our programs attached to ``ifindex`` (for status and tests)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        names = []
        with IPRoute() as ipr:
            for parent in PARENTS.values():
                try:
                    filters = ipr.get_filters(index=ifindex,
                                              parent=int(parent.replace(":", ""), 16))
                except NetlinkError:
                    continue
                for f in filters:
                    options = f.get_attr("TCA_OPTIONS")
                    name = options.get_attr("TCA_BPF_NAME") if options else None
                    if name:
                        names.append(name)
        return names
