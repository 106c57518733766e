"""One source of truth for the structs the programs and the agent share (Cilium's alignchecker):
the compiler's own sizeof/offsetof of every struct in bpf/lib/common.h, read back by running a
program built for it, must equal the ctypes twins in plugins/ebpf/maps.py — and every map's
pinned layout must be what the agent expects."""

import ctypes as ct
import os

import pytest

from meshagent.plugins.ebpf.maps import C_STRUCTS, MAP_NAMES, TYPES, expected_layout
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not can_run(), reason="needs root and BPF")]


def c_facts() -> list[tuple[str, str]]:
    """(what, C expression) for every size, offset and field size to compare."""
    facts = []
    for name, cls in C_STRUCTS.items():
        facts.append((f"sizeof({name})", f"sizeof(struct {name})"))
        for field, _ in cls._fields_:
            if field.startswith("pad"):
                continue
            facts.append((f"{name}.{field} offset", f"offsetof(struct {name}, {field})"))
            facts.append((f"{name}.{field} size", f"sizeof(((struct {name} *)0)->{field})"))
    return facts


def py_facts() -> dict[str, int]:
    out = {}
    for name, cls in C_STRUCTS.items():
        out[f"sizeof({name})"] = ct.sizeof(cls)
        for field, ftype in cls._fields_:
            if not field.startswith("pad"):
                out[f"{name}.{field} offset"] = getattr(cls, field).offset
                out[f"{name}.{field} size"] = ct.sizeof(ftype)
    return out


def test_ctypes_structs_match_what_the_compiler_lays_out():
    from bcc import BPF

    from meshagent.plugins.ebpf.loader import bpf_source_dir
    from meshagent.plugins.ebpf.testrun import BPF_PROG_TEST_RUN, SYS_BPF, _TestRunAttr
    facts = c_facts()
    lines = "\n".join(f"    v = {expr}; layout.update(&i, &v); i++;" for _, expr in facts)
    text = (bpf_source_dir() / "lib" / "common.h").read_text() + f"""
BPF_ARRAY(layout, u64, {len(facts)});
int report_layout(struct __sk_buff *skb)
{{
    u32 i = 0;
    u64 v;
{lines}
    return 0;
}}
"""
    bpf = BPF(text=text.encode(), cflags=["-Wno-unused-function"])
    function = bpf.load_func(b"report_layout", BPF.SCHED_CLS)
    frame = ct.create_string_buffer(bytes(64), 64)
    attr = _TestRunAttr(prog_fd=function.fd, data_size_in=64, data_in=ct.addressof(frame),
                        repeat=1)
    libc = ct.CDLL(None, use_errno=True)
    assert libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ct.byref(attr), ct.sizeof(attr)) == 0, \
        os.strerror(ct.get_errno())
    table = bpf[b"layout"]
    compiled = {what: table[ct.c_int(i)].value for i, (what, _) in enumerate(facts)}
    ours = py_facts()
    differences = {what: (compiled[what], ours[what]) for what in compiled
                   if compiled[what] != ours[what]}
    assert not differences, f"C vs ctypes: {differences}"
    assert len(compiled) > 100  # every struct, every field


def test_every_map_has_a_struct_pair_and_a_layout():
    for name in MAP_NAMES:
        key, value = TYPES[name]
        assert expected_layout(name, {})[1:3] == (ct.sizeof(key), ct.sizeof(value))


def test_the_event_readers_struct_reads_every_field_of_flow_event_record():
    """The reader decodes a record with one struct.unpack (plugins/ebpf/events.py RECORD):
    each field of a FlowEventRecord (checked against the compiler above) comes out as
    itself."""
    from meshagent.plugins.ebpf.events import RECORD
    from meshagent.plugins.ebpf.maps import FlowEventRecord
    fields = [name for name, _ in FlowEventRecord._fields_ if name != "pad"]
    record = FlowEventRecord()
    for n, name in enumerate(fields, start=1):
        value = getattr(record, name)
        if isinstance(value, ct.Array):
            value[:] = bytes(range(n, n + len(value)))
        else:
            setattr(record, name, n)
    assert RECORD.size == ct.sizeof(FlowEventRecord)
    decoded = dict(zip(fields, RECORD.unpack(bytes(record)), strict=True))
    for name in fields:
        value = getattr(record, name)
        assert decoded[name] == (bytes(value) if isinstance(value, ct.Array) else value), name
