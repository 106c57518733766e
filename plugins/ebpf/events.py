"""The programs' flow events, read straight from the perf rings' shared memory.

Each CPU has a ring per event array (``perf_event_open`` of a BPF output event, mmap'd); the
programs write records into it and never wait: what finds no room the kernel counts and
reports with the next record that fits (a lost record). Reading a ring takes one copy of
what it holds and one ``struct`` unpack per record, without a call from C into Python per
record (bcc's perf reader calls one; it cost more than the decoding).

The kernel wakes the reader once ``wakeup_events`` records are in a ring, not on every one;
whoever reads also reads a ring on a short period, so that a lone record does not wait for
company. x86_64 only (its syscall numbers, and its memory order, under which reading the head
before the records and writing the tail after copying them needs no barrier).
"""

import ctypes as ct
import fcntl
import mmap
import os
import socket
import struct

from meshagent.plugin import (
    AUDIT,
    DROP,
    DROPPED,
    FORWARDED,
    POLICY_VERDICT,
    REDIRECTED,
    TRACE,
    FlowEvent,
    FlowEventSink,
)
from meshagent.plugins.ebpf.maps import (
    DIR_INGRESS,
    FLOW_AUDIT,
    FLOW_DROP,
    FLOW_DROPPED,
    FLOW_FORWARDED,
    FLOW_POLICY_VERDICT,
    FLOW_REDIRECTED,
    FLOW_TRACE,
    REASON_KEYS,
    boot_offset_ns,
)

SYS_PERF_EVENT_OPEN = 298  # x86_64
PERF_TYPE_SOFTWARE, PERF_COUNT_SW_BPF_OUTPUT = 1, 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_RECORD_LOST, PERF_RECORD_SAMPLE = 2, 9
ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5
HEAD_OFFSET, TAIL_OFFSET = 1024, 1032  # struct perf_event_mmap_page: data_head, data_tail

_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<IHH")  # struct perf_event_header: type, misc, size


class PerfRing:
    """One CPU's ring for one BPF_MAP_TYPE_PERF_EVENT_ARRAY (register ``fd`` at that CPU's
    index of the array)."""

    def __init__(self, cpu: int, pages: int, wakeup_events: int):
        attr = ct.create_string_buffer(ATTR_SIZE)
        struct.pack_into("<IIQQQ", attr, 0, PERF_TYPE_SOFTWARE, ATTR_SIZE,
                         PERF_COUNT_SW_BPF_OUTPUT, 1, PERF_SAMPLE_RAW)  # sample_period 1
        struct.pack_into("<I", attr, 48, wakeup_events)
        libc = ct.CDLL(None, use_errno=True)
        fd = libc.syscall(SYS_PERF_EVENT_OPEN, attr, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            errno = ct.get_errno()
            raise OSError(errno, f"perf_event_open on CPU {cpu}: {os.strerror(errno)}")
        self.fd = fd
        self.page = mmap.PAGESIZE
        self.size = pages * self.page
        try:
            self.mm = mmap.mmap(fd, self.page + self.size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
        except OSError:
            os.close(fd)
            raise

    def take(self) -> bytes:
        """Every record the ring holds, as one byte string; their room is free again."""
        mm = self.mm
        head = _U64.unpack_from(mm, HEAD_OFFSET)[0]
        tail = _U64.unpack_from(mm, TAIL_OFFSET)[0]
        if head == tail:
            return b""
        start = self.page + tail % self.size
        end = start + (head - tail)
        if end <= self.page + self.size:
            chunk = mm[start:end]
        else:  # the records wrap around the ring's end
            chunk = mm[start:self.page + self.size] + mm[self.page:end - self.size]
        _U64.pack_into(mm, TAIL_OFFSET, head)
        return chunk

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


#: ``struct flow_event`` after the raw sample's 4-byte size (checked against FlowEventRecord by
#: tests/test_datapath_layout.py): time_ns, reason, endpoint_id, saddr, daddr, sport, dport,
#: protocol, tcp_flags, direction, family, src_identity, dst_identity, saddr6, daddr6, kind,
#: verdict, is_reply, match.
RECORD = struct.Struct("<QII4s4sHHBBBBII16s16sBBBB4x")
#: A sample record as the ring holds it: perf_event_header (type, misc, size), the raw data's
#: size, then RECORD.
SAMPLE = struct.Struct("<IHHI" + RECORD.format[1:])

KINDS = {FLOW_DROP: DROP, FLOW_POLICY_VERDICT: POLICY_VERDICT, FLOW_TRACE: TRACE}
VERDICTS = {FLOW_FORWARDED: FORWARDED, FLOW_DROPPED: DROPPED, FLOW_AUDIT: AUDIT,
            FLOW_REDIRECTED: REDIRECTED}
_ADDRESS_CACHE = 65536  # texts kept per family before the cache starts afresh


class EventReader:
    """Takes what the rings hold, decodes each record into a FlowEvent and hands it to the
    sink, in each ring's order; lost records become ``sink.lost``."""

    def __init__(self, sink: FlowEventSink):
        self.sink = sink
        self.rings: list[PerfRing] = []
        self._ip4: dict[bytes, str] = {}
        self._ip6: dict[bytes, str] = {}

    def read_all(self) -> None:
        for ring in self.rings:
            self.read(ring)

    def read(self, ring: PerfRing) -> None:
        chunk = ring.take()
        if not chunk:
            return
        offset_ns = boot_offset_ns()  # once a batch: the records' clock to the wall clock
        publish, unpack = self.sink.publish, SAMPLE.unpack_from
        ip4, ip6, text4, text6 = self._ip4, self._ip6, self._text4, self._text6
        kinds, verdicts, reasons = KINDS, VERDICTS, REASON_KEYS
        offset, length, whole = 0, len(chunk), SAMPLE.size
        while offset < length:
            if length - offset < whole or chunk[offset] != PERF_RECORD_SAMPLE:
                offset += self._other(chunk, offset)  # a lost record (type < 256)
                continue
            (_, _, size, _, time_ns, reason, endpoint, saddr, daddr, sport, dport, protocol,
             tcp_flags, direction, family, src_identity, dst_identity, saddr6, daddr6, kind,
             verdict, is_reply, match) = unpack(chunk, offset)
            offset += size
            if family == 6:
                source = ip6.get(saddr6) or text6(saddr6)
                destination = ip6.get(daddr6) or text6(daddr6)
            else:
                source = ip4.get(saddr) or text4(saddr)
                destination = ip4.get(daddr) or text4(daddr)
            publish(FlowEvent(  # positional (cheaper than keywords), in its field order
                time_ns + offset_ns, kinds.get(kind, DROP), verdicts.get(verdict, DROPPED),
                reasons.get(reason) or str(reason), endpoint,
                "ingress" if direction == DIR_INGRESS else "egress", source, sport,
                destination, dport, protocol, tcp_flags, src_identity, dst_identity,
                is_reply != 0, match))

    def _other(self, chunk: bytes, offset: int) -> int:
        """A record other than a sample: a lost one is counted. Returns its size."""
        record, _, size = _HEADER.unpack_from(chunk, offset)
        if record == PERF_RECORD_LOST:
            self.sink.lost(_U64.unpack_from(chunk, offset + 16)[0])
        return size

    def _text4(self, raw: bytes) -> str:
        text = self._ip4.get(raw)
        if text is None:
            if len(self._ip4) >= _ADDRESS_CACHE:
                self._ip4.clear()
            text = self._ip4[raw] = socket.inet_ntoa(raw)
        return text

    def _text6(self, raw: bytes) -> str:
        text = self._ip6.get(raw)
        if text is None:
            if len(self._ip6) >= _ADDRESS_CACHE:
                self._ip6.clear()
            text = self._ip6[raw] = socket.inet_ntop(socket.AF_INET6, raw)
        return text

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings.clear()
