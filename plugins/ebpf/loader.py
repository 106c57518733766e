"""Compiling, loading and attaching meshagent's tc programs (bcc + pyroute2).

bcc rewrites map accesses only in the main source file, so each attach-point file is handed to
it with its ``#include "lib/..."`` lines expanded in place. The two programs share every map by
pinning them under ``<bpf-root>/meshagent``.
"""

import json
import os
import re
from pathlib import Path
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshagent.plugin import MeshagentError

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


def compile_programs(pin_dir: Path, defines: dict[str, int]) -> dict[str, tuple]:
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
    root = bpf_source_dir()
    cflags = [f'-DPIN_DIR="{pin_dir}"', "-Wno-unused-function", "-Wno-macro-redefined"]
    cflags += [f"-D{name}={value}" for name, value in defines.items()]
    loaded = {}
    for name in PROGRAMS:
        text = expand_includes(root / f"{name}.c", root)
        try:
            bpf = BPF(text=text, cflags=cflags)
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


async def compile_in_child(pin_dir: Path, defines: dict) -> list[str]:
    """Compile and pin the programs in a child process (keeps LLVM's peak out of the agent);
    the names of pinned maps of another layout it had to start afresh."""
    import asyncio
    import sys
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshagent.plugins.ebpf.compile", str(pin_dir),
        json.dumps(defines), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await child.communicate()
    if child.returncode != 0:
        message = err.decode().strip().splitlines()
        raise DatapathError(message[-1] if message else f"compiling the programs failed"
                                                        f" (exit {child.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])["replaced"]


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
