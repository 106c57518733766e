"""The compiled-program cache (meshagent.plugins.ebpf.progcache): the first start fills it, a
hit behaves exactly as a compile (the datapath contract suite runs on programs loaded from it),
anything that changes the programs misses it, and a damaged or foreign file is never loaded.

Privileged: each datapath gets a bpffs of its own, each test a cache directory of its own.
"""

import base64
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from test_datapath_differential import KernelJudge, kernel_judge

from meshagent.plugins.ebpf import loader, progcache
from meshagent.testing.datapath_contract import DatapathContract, ScenarioDriver
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root and BPF")]

CASES_DIR = Path(__file__).parent / "datapath_cases"


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json"))


def masked_programs(path: Path) -> dict[str, bytes]:
    """An entry's instructions with the map fds (which differ between loads) zeroed."""
    _, _, body = path.read_bytes().partition(b"\n")
    out = {}
    for name, program in json.loads(body)["programs"].items():
        insns = bytearray(base64.b64decode(program["insns"]))
        for index, _map in program["relocations"]:
            struct.pack_into("<i", insns, index * 8 + 4, 0)
        out[name] = bytes(insns)
    return out


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    """A cache filled by one datapath's start (which compiled: the cache was empty)."""
    cache = tmp_path_factory.mktemp("progcache")
    with kernel_judge(program_cache=cache) as kernel:
        assert not kernel.datapath.programs_cached
    assert len(entries(cache)) == 1
    return cache


def test_the_first_start_fills_the_cache_and_the_next_loads_from_it(warm_cache):
    with kernel_judge(program_cache=warm_cache) as kernel:
        assert kernel.datapath.programs_cached
        assert set(kernel.datapath.programs) == set(loader.PROGRAMS)
    assert len(entries(warm_cache)) == 1


def test_a_restart_from_the_cache_keeps_the_pinned_maps_and_their_entries(warm_cache, tmp_path):
    import ctypes as ct
    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    assert os.system(f"mount -t bpf bpf {bpffs}") == 0
    try:
        first = KernelJudge(bpffs, program_cache=warm_cache)
        assert first.datapath.programs_cached
        first.datapath.maps["generation"].put(ct.c_uint32(0), ct.c_uint32(4242))
        first.close()
        again = KernelJudge(bpffs, program_cache=warm_cache)
        try:
            assert again.datapath.programs_cached
            assert again.datapath.replaced_maps == []
            assert again.datapath.generation > 4242  # the pinned map, as the last agent left it
        finally:
            again.close()
    finally:
        os.system(f"umount -l {bpffs}")


@pytest.fixture(scope="module")
def judge(warm_cache):
    with kernel_judge(program_cache=warm_cache) as kernel:
        assert kernel.datapath.programs_cached
        yield kernel


@pytest.fixture
def driver(judge) -> ScenarioDriver:
    return ScenarioDriver(judge)


class TestContractOnCachedPrograms(DatapathContract):
    """The datapath contract suite, on programs loaded from the cache (no compiler run)."""

    kept_cases = CASES_DIR


def test_other_defines_miss_and_are_compiled(warm_cache, tmp_path):
    cache = tmp_path / "cache"
    (cache_file,) = entries(warm_cache)
    cache.mkdir(mode=0o700)
    (cache / cache_file.name).write_bytes(cache_file.read_bytes())
    with kernel_judge(program_cache=cache, ipcache_max=32768) as kernel:
        assert not kernel.datapath.programs_cached
    assert len(entries(cache)) == 2


def test_a_changed_source_or_kernel_is_another_key_and_the_pin_dir_is_not():
    sources = loader.program_sources()
    flags = loader.compiler_flags(Path("/sys/fs/bpf/meshagent"), {"IPCACHE_MAX": 1024})
    key = progcache.cache_key(sources, flags)
    assert progcache.cache_key(sources, loader.compiler_flags(
        Path("/elsewhere/meshagent"), {"IPCACHE_MAX": 1024})) == key
    assert progcache.cache_key(sources, loader.compiler_flags(
        Path("/sys/fs/bpf/meshagent"), {"IPCACHE_MAX": 2048})) != key
    changed = {**sources, "to_container": sources["to_container"] + "\n/* changed */\n"}
    assert progcache.cache_key(changed, flags) != key
    real = os.uname()
    for field in ("release", "version"):
        fake = os.uname_result(tuple(f"{v}-other" if name == field else v for name, v in zip(
            ("sysname", "nodename", "release", "version", "machine"), real)))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "uname", lambda fake=fake: fake)
            assert progcache.cache_key(sources, flags) != key


def test_a_changed_compiler_misses(warm_cache, tmp_path):
    (cache_file,) = entries(warm_cache)
    _, _, body = cache_file.read_bytes().partition(b"\n")
    entry = json.loads(body)
    key = cache_file.stem
    assert progcache.lookup(warm_cache, key) is not None
    assert any("libbcc" in path for path, *_ in entry["toolchain"])
    entry["toolchain"][0][2] += 1  # as if the library had been replaced
    cache = tmp_path / "cache"
    progcache.store(cache, key, entry)
    assert progcache.lookup(cache, key) is None
    body = json.dumps(entry).encode()  # and a checksum that matches does not change that
    (cache / f"{key}.json").write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    assert progcache.lookup(cache, key) is None


def test_a_corrupt_file_is_compiled_again_and_replaced(warm_cache, tmp_path):
    (cache_file,) = entries(warm_cache)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    damaged = bytearray(cache_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # one bit, inside the instructions
    (cache / cache_file.name).write_bytes(damaged)
    assert progcache.lookup(cache, cache_file.stem) is None
    with kernel_judge(program_cache=cache) as kernel:
        assert not kernel.datapath.programs_cached
    assert progcache.lookup(cache, cache_file.stem) is not None
    # compiled again (on another bpffs, so another PIN_DIR): the same instructions
    assert masked_programs(cache / cache_file.name) == masked_programs(cache_file)


def test_a_file_others_may_write_or_own_is_not_loaded(warm_cache, tmp_path):
    (cache_file,) = entries(warm_cache)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    copy = cache / cache_file.name
    copy.write_bytes(cache_file.read_bytes())
    copy.chmod(0o600)
    assert progcache.lookup(cache, cache_file.stem) is not None
    copy.chmod(0o666)
    assert progcache.lookup(cache, cache_file.stem) is None
    copy.chmod(0o600)
    cache.chmod(0o777)
    assert progcache.lookup(cache, cache_file.stem) is None
    cache.chmod(0o700)
    os.chown(copy, 65534, 65534)  # another user's (nobody's)
    assert progcache.lookup(cache, cache_file.stem) is None



def test_the_cache_is_in_the_state_dir_unless_told_and_can_be_turned_off():
    from meshagent.plugins import ebpf
    from meshagent.plugins.ebpf.datapath import EbpfSettings
    from meshagent.runtime.config import Config, add_core_options
    from meshagent.runtime.options import Parser

    def settings(*args: str) -> EbpfSettings:
        parser = Parser()
        add_core_options(parser)
        ebpf.meshagent_addoption(parser)
        return EbpfSettings.from_config(Config.from_parsed(parser.parse(list(args), {})))
    assert settings("--state-dir", "/run/x").program_cache == Path("/run/x/bpf-programs")
    assert settings("--ebpf-program-cache-dir", "/tmp/x").program_cache == Path("/tmp/x")
    assert settings("--ebpf-program-cache=false").program_cache is None
