"""Compiled programs kept by content hash, so that a start whose programs, defines, kernel and
compiler are unchanged loads them without clang (Cilium keeps its compiled datapath templates
by a hash of their configuration in the same spirit: ``pkg/datapath/loader/cache.go``).

An entry is what bcc produced: each program's instructions, which of its ``ld_imm64``
instructions carry which map's fd, and the attributes of every map it declared. A hit opens
the pinned maps (creating those missing, as bcc does), creates the program's own ones, patches
their fds into the instructions and has the kernel load and verify them.

The key is a SHA-256 of the expanded C source, the compiler flags (all but ``PIN_DIR``, which
only says where maps are pinned: a hit pins them itself), the kernel (release, version,
possible CPUs) and this file's format. The entry also names the compiler's libraries and the
kernel headers it used (path, size, mtime); a hit requires them unchanged. A file carries a
SHA-256 of its body, and must belong to this user and be writable by no one else: anything
else is a miss, compiled again and written afresh, never loaded.
"""

import base64
import ctypes as ct
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from pathlib import Path

from meshagent.plugin import MeshagentError

log = logging.getLogger(__name__)

FORMAT = 1
BPF_PROG_TYPE_SCHED_CLS = 3
LD_IMM64 = 0x18  # BPF_LD | BPF_DW | BPF_IMM: two instruction slots, a 64-bit immediate
BPF_PSEUDO_MAP_FD = 1  # its src_reg when the immediate is a map's fd
TOOLCHAIN = re.compile(r"/lib(bcc|LLVM|clang)[^/]*$")  # libbcc, libbcc_bpf, libLLVM, libclang-cpp
LOG_SIZE = 1 << 20


class CacheError(MeshagentError):
    """An entry cannot be made or used: the programs are compiled instead."""


def cache_key(sources: dict[str, str], cflags: list[str]) -> str:
    """The key of programs compiled from ``sources`` (name -> expanded C) with ``cflags``."""
    from meshagent.plugins.ebpf.maps import possible_cpus
    uname = os.uname()
    flags = sorted(f for f in cflags if not f.startswith("-DPIN_DIR="))
    text = json.dumps([FORMAT, uname.release, uname.version, possible_cpus(), flags,
                       sorted(sources.items())])
    return hashlib.sha256(text.encode()).hexdigest()


def toolchain() -> list[list]:
    """The compiler libraries this process has mapped and the kernel headers bcc reads, as
    [path, size, mtime_ns]: what a hit requires to be unchanged."""
    with open("/proc/self/maps") as maps:
        paths = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    release = os.uname().release
    paths = sorted(p for p in paths if TOOLCHAIN.search(p)) + [
        os.path.realpath(f"/lib/modules/{release}/{tree}") for tree in ("build", "source")]
    return [[path, *_stamp(path)] for path in paths]


def _stamp(path: str) -> list[int]:
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


def record(loaded: dict[str, tuple]) -> dict:
    """An entry for the programs bcc compiled and loaded (``{name: (BPF, function)}``, in the
    compiling process); CacheError when one refers to something other than a map's fd."""
    from bcc.libbcc import lib
    for name, (result, arguments) in _BCC_SIGNATURES.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = result, arguments
    programs = {}
    for name, (bpf, _function) in loaded.items():
        module = bpf.module
        maps, by_fd = [], {}
        for i in range(lib.bpf_num_tables(module)):
            table = lib.bpf_table_name(module, i).decode()
            by_fd[lib.bpf_table_fd_id(module, i)] = table
            maps.append({"name": table, "type": lib.bpf_table_type_id(module, i),
                         "key_size": lib.bpf_table_key_size_id(module, i),
                         "value_size": lib.bpf_table_leaf_size_id(module, i),
                         "max_entries": lib.bpf_table_max_entries_id(module, i),
                         "flags": lib.bpf_table_flags_id(module, i)})
        insns = bpf.dump_func(name)
        relocations = []
        for index in range(0, len(insns) // 8):
            code, regs, _off, imm = struct.unpack_from("<BBhi", insns, index * 8)
            if code != LD_IMM64 or not regs >> 4:
                continue
            if regs >> 4 != BPF_PSEUDO_MAP_FD or imm not in by_fd:
                raise CacheError(f"{name}: instruction {index} loads something other than a"
                                 f" map's fd (src_reg {regs >> 4})")
            relocations.append([index, by_fd[imm]])
        programs[name] = {"license": lib.bpf_module_license(module).decode(),
                          "kern_version": lib.bpf_module_kern_version(module),
                          "insns": base64.b64encode(insns).decode(), "maps": maps,
                          "relocations": relocations}
    return {"format": FORMAT, "toolchain": toolchain(), "programs": programs}


def store(cache_dir: Path, key: str, entry: dict) -> Path:
    """Write an entry to a temporary file and rename it into place, so that a reader never
    finds half of one."""
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = json.dumps(entry, separators=(",", ":")).encode()
    path = cache_dir / f"{key}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=cache_dir)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def lookup(cache_dir: Path, key: str) -> dict | None:
    """The entry stored under ``key`` if it is whole, ours, and its toolchain unchanged."""
    path = cache_dir / f"{key}.json"
    try:
        for checked in (cache_dir, path):
            info = os.stat(checked)
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                raise CacheError(f"{checked} is not this user's alone")
        digest, _, body = path.read_bytes().partition(b"\n")
        if hashlib.sha256(body).hexdigest().encode() != digest:
            raise CacheError(f"{path} does not match its checksum")
        entry = json.loads(body)
        if entry["format"] != FORMAT:
            return None
        for stamped_path, *stamp in entry["toolchain"]:
            if _stamp(stamped_path) != stamp:
                return None  # the compiler or the kernel headers changed
        return entry
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, CacheError) as exc:
        log.warning("not using the cached eBPF programs %s: %s", path, exc)
        return None


def load(entry: dict, pin_dir: Path) -> None:
    """Load and pin every program of an entry as the compile child does (``prog_<name>``,
    its event array as ``events_<name>``); pinned maps are opened or created and pinned.
    CacheError says why it could not."""
    from meshagent.plugins.ebpf.maps import MAP_NAMES, bpf_lib
    lib = bpf_lib()
    for name, (result, arguments) in _LOAD_SIGNATURES.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = result, arguments
    opened: list[int] = []
    try:
        for name, program in entry["programs"].items():
            fds = {}
            for spec in program["maps"]:
                pinned = spec["name"] in MAP_NAMES
                fds[spec["name"]] = fd = (_pinned_map(lib, pin_dir, spec) if pinned
                                          else _new_map(lib, spec))
                opened.append(fd)
            insns = bytearray(base64.b64decode(program["insns"]))
            for index, map_name in program["relocations"]:
                struct.pack_into("<i", insns, index * 8 + 4, fds[map_name])
            log = ct.create_string_buffer(LOG_SIZE)
            buffer = (ct.c_char * len(insns)).from_buffer(insns)
            fd = lib.bcc_prog_load(BPF_PROG_TYPE_SCHED_CLS, name.encode(), buffer, len(insns),
                                   program["license"].encode(), program["kern_version"], 0,
                                   log, LOG_SIZE)
            if fd < 0:
                raise CacheError(f"the kernel refused the cached {name}:"
                                 f" {os.strerror(ct.get_errno())} {log.value[-400:]!r}")
            opened.append(fd)
            _pin(lib, fd, pin_dir / f"prog_{name}")
            _pin(lib, fds["flow_events"], pin_dir / f"events_{name}")
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise CacheError(f"a malformed cache entry ({exc!r})") from None
    finally:
        for fd in opened:
            os.close(fd)


def _pinned_map(lib, pin_dir: Path, spec: dict) -> int:
    """The map pinned under its name (as bcc's BPF_TABLE_PINNED: opened when there, else
    created and pinned); CacheError when what is pinned is not what the programs expect."""
    from meshagent.plugins.ebpf.maps import pinned_layout
    path = pin_dir / spec["name"]
    layout = (spec["type"], spec["key_size"], spec["value_size"], spec["max_entries"],
              spec["flags"])
    fd = lib.bpf_obj_get(str(path).encode())
    if fd >= 0:
        if pinned_layout(path) != layout:
            os.close(fd)
            raise CacheError(f"the pinned map {path} is not of the cached programs' layout")
        return fd
    fd = _new_map(lib, spec)
    if lib.bpf_obj_pin(fd, str(path).encode()) != 0:
        os.close(fd)
        raise CacheError(f"pinning {path} failed: {os.strerror(ct.get_errno())}")
    return fd


def _new_map(lib, spec: dict) -> int:
    fd = lib.bcc_create_map(spec["type"], spec["name"].encode(), spec["key_size"],
                            spec["value_size"], spec["max_entries"], spec["flags"])
    if fd < 0:
        raise CacheError(f"creating map {spec['name']} failed: {os.strerror(ct.get_errno())}")
    return fd


def _pin(lib, fd: int, path: Path) -> None:
    path.unlink(missing_ok=True)
    if lib.bpf_obj_pin(fd, str(path).encode()) != 0:
        raise CacheError(f"pinning {path} failed: {os.strerror(ct.get_errno())}")


_LOAD_SIGNATURES = {  # libbcc_bpf, as src/cc/libbpf.h declares them
    "bcc_create_map": (ct.c_int, [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int]),
    "bcc_prog_load": (ct.c_int, [ct.c_int, ct.c_char_p, ct.c_void_p, ct.c_int, ct.c_char_p,
                                 ct.c_uint, ct.c_int, ct.c_char_p, ct.c_uint]),
}
_BCC_SIGNATURES = {  # libbcc's module queries, as src/cc/bcc_common.h declares them
    "bpf_num_tables": (ct.c_size_t, [ct.c_void_p]),
    "bpf_table_name": (ct.c_char_p, [ct.c_void_p, ct.c_size_t]),
    "bpf_table_fd_id": (ct.c_int, [ct.c_void_p, ct.c_size_t]),
    "bpf_table_type_id": (ct.c_int, [ct.c_void_p, ct.c_size_t]),
    "bpf_table_key_size_id": (ct.c_size_t, [ct.c_void_p, ct.c_size_t]),
    "bpf_table_leaf_size_id": (ct.c_size_t, [ct.c_void_p, ct.c_size_t]),
    "bpf_table_max_entries_id": (ct.c_size_t, [ct.c_void_p, ct.c_size_t]),
    "bpf_table_flags_id": (ct.c_int, [ct.c_void_p, ct.c_size_t]),
}
