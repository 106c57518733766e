"""Running the pinned tc programs on synthetic packets in the kernel (``BPF_PROG_TEST_RUN``).

The kernel runs the program on a copy of the frame as if it arrived on the loopback device
(ifindex 1) and hands back the program's return code, the frame as the program left it, and
the ``__sk_buff`` context — whose ``cb[0]`` the programs set to their verdict reason. Nothing
is sent anywhere. Used by the differential tests and the layout checks; needs root.
"""

import ctypes as ct
import os
import struct
from pathlib import Path

import attrs

from meshagent.plugins.ebpf import loader

SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
SK_BUFF_SIZE = 192  # sizeof(struct __sk_buff)
SK_BUFF_CB0 = 48  # offsetof(struct __sk_buff, cb[0])
SK_BUFF_MARK = 8  # offsetof(struct __sk_buff, mark)
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
LOOPBACK_IFINDEX = 1


class _TestRunAttr(ct.Structure):
    """The BPF_PROG_TEST_RUN member of ``union bpf_attr``."""

    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("data_in", ct.c_uint64), ("data_out", ct.c_uint64), ("repeat", ct.c_uint32),
                ("duration", ct.c_uint32), ("ctx_size_in", ct.c_uint32),
                ("ctx_size_out", ct.c_uint32), ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
                ("pad", ct.c_uint32)]


@attrs.frozen
class RunResult:
    action: int  # TC_ACT_OK, TC_ACT_SHOT or TC_ACT_REDIRECT (into a local pod)
    reason: int  # the program's cb[0]
    frame: bytes  # as the program left it (rewritten by service NAT, for one)
    mark: int = 0  # skb->mark as the program left it


class ProgramRunner:
    """The pinned programs of one pin dir, run on frames."""

    def __init__(self, pin_dir: Path):
        self._libc = ct.CDLL(None, use_errno=True)
        self.programs = {name: loader.PinnedProgram(pin_dir, name) for name in loader.PROGRAMS}

    def close(self) -> None:
        for program in self.programs.values():
            program.close()

    def run(self, program: str, frame: bytes) -> RunResult:
        data_in = ct.create_string_buffer(frame, len(frame))
        data_out = ct.create_string_buffer(len(frame) + 256)
        ctx_in = (ct.c_uint8 * SK_BUFF_SIZE)()
        ctx_out = (ct.c_uint8 * SK_BUFF_SIZE)()
        struct.pack_into("I", ctx_in, SK_BUFF_CB0, 0xFFFFFFFF)  # "not set"
        attr = _TestRunAttr(prog_fd=self.programs[program].fd, data_size_in=len(frame),
                            data_size_out=len(data_out), data_in=ct.addressof(data_in),
                            data_out=ct.addressof(data_out), repeat=1,
                            ctx_size_in=SK_BUFF_SIZE, ctx_size_out=SK_BUFF_SIZE,
                            ctx_in=ct.addressof(ctx_in), ctx_out=ct.addressof(ctx_out))
        if self._libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ct.byref(attr), ct.sizeof(attr)) != 0:
            errno = ct.get_errno()
            raise OSError(errno, f"BPF_PROG_TEST_RUN: {os.strerror(errno)}")
        reason = struct.unpack_from("I", ctx_out, SK_BUFF_CB0)[0]
        mark = struct.unpack_from("I", ctx_out, SK_BUFF_MARK)[0]
        return RunResult(attr.retval, reason, data_out.raw[:attr.data_size_out], mark)


class NoAttacher:
    """Attaches nothing: for a datapath whose programs only run on synthetic packets."""

    def attach(self, ifindex: int, programs) -> None:
        pass

    def attached(self, ifindex: int) -> list[str]:
        return list(loader.PROGRAMS)
