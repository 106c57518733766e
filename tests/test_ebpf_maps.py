"""Batched writes to pinned BPF maps (``PinnedMap.put_many``) against one write a syscall.

Privileged: real maps, created and pinned on a bpffs of the test's own.
"""

import ctypes as ct
import errno
import os
import random

import pytest

from meshagent.errors import MeshagentError
from meshagent.plugins.ebpf import maps
from meshagent.plugins.ebpf.maps import (
    MAP_HASH,
    MAP_LPM_TRIE,
    NO_PREALLOC,
    IPCacheKey,
    IPCacheValue,
    IPv4Bytes,
    PinnedMap,
    bpf_lib,
)
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not can_run(), reason="needs root and BPF")]


def pinned(pin_dir, name: str, map_type: int, max_entries: int, flags: int = 0) -> PinnedMap:
    """A new ipcache-shaped map (8-byte keys and values), pinned as ``name``."""
    lib = bpf_lib()
    create = lib.bcc_create_map
    create.restype = ct.c_int
    create.argtypes = [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int]
    fd = create(map_type, name.encode(), 8, 8, max_entries, flags)
    assert fd >= 0, ct.get_errno()
    try:
        assert lib.bpf_obj_pin(fd, str(pin_dir / name).encode()) == 0
    finally:
        os.close(fd)
    return PinnedMap(pin_dir, name, (IPCacheKey, IPCacheValue))


def rows(count: int, seed: int) -> list[tuple[IPCacheKey, IPCacheValue]]:
    """Host and range prefixes (some repeated: the last write of a key wins)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.choice((32, 32, 32, 24, 16, 8))
        address = rng.getrandbits(32) & ((1 << 32) - (1 << (32 - length)))
        out.append((IPCacheKey(length, IPv4Bytes(*address.to_bytes(4, "big"))),
                    IPCacheValue(rng.randrange(1, 1 << 24), rng.randrange(2))))
    return out + out[: count // 10]


def contents(table: PinnedMap) -> dict[bytes, bytes]:
    return {bytes(key): bytes(value) for key, value in table.items()}


@pytest.mark.parametrize("map_type, flags", [(MAP_LPM_TRIE, NO_PREALLOC), (MAP_HASH, 0)])
def test_a_batch_write_leaves_what_one_write_a_syscall_leaves(bpffs, monkeypatch, map_type,
                                                              flags):
    monkeypatch.setattr(maps, "BATCH_SIZE", 1000)  # several batches and a partial last one
    written = rows(4500, seed=map_type)
    one, many = (pinned(bpffs, name, map_type, 10_000, flags) for name in ("one", "many"))
    for key, value in written:
        one.put(key, value)
    many.put_many([bytes(k) for k, _ in written], [bytes(v) for _, v in written])
    assert many.batches  # this kernel has BPF_MAP_UPDATE_BATCH for the type
    assert contents(many) == contents(one)
    assert len(contents(one)) > 3000


def test_without_batches_every_element_is_written_one_by_one(bpffs, monkeypatch):
    written = rows(300, seed=7)
    one, many = pinned(bpffs, "one", MAP_HASH, 1000), pinned(bpffs, "many", MAP_HASH, 1000)
    for key, value in written:
        one.put(key, value)
    real = bpf_lib()

    class NoBatch:
        """libbcc_bpf as on a kernel without BPF_MAP_UPDATE_BATCH (EINVAL, nothing done)."""

        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def bpf_update_batch(fd, keys, values, count):
            ct.set_errno(errno.EINVAL)
            count._obj.value = 0
            return -errno.EINVAL

    monkeypatch.setattr(many, "_lib", NoBatch())
    many.put_many([bytes(k) for k, _ in written], [bytes(v) for _, v in written])
    assert not many.batches
    assert contents(many) == contents(one)


def test_a_full_map_fails_a_batch_as_it_fails_one_write(bpffs):
    table = pinned(bpffs, "small", MAP_HASH, 100)
    written = rows(150, seed=3)
    keys = list(dict.fromkeys(bytes(k) for k, _ in written))
    with pytest.raises(MeshagentError, match="the map is full"):
        table.put_many(keys, [bytes(IPCacheValue(1, 0))] * len(keys))
    assert len(table) == 100


def test_keys_and_values_must_pair_up(bpffs):
    table = pinned(bpffs, "pairs", MAP_HASH, 10)
    with pytest.raises(ValueError):
        table.put_many([bytes(IPCacheKey())], [])
    with pytest.raises(ValueError):
        table.put_many([b"short"], [bytes(IPCacheValue())])
    assert len(table) == 0
