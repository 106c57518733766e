"""The etcd backend passes the kvstore contract against a real etcd, plain and TLS."""

import asyncio

import pytest

from meshagent.errors import UsageError
from meshagent.kvstore import KVStoreUnavailable, RevisionCompacted
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config
from meshagent.testing.kvstore_contract import KVStoreContract, client_factory, next_events
from meshagent_dev.etcd import EtcdServer, free_port


@pytest.fixture(scope="module")
def etcd_plain():
    server = EtcdServer("plain").start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def etcd_tls():
    server = EtcdServer("tls", tls=True).start()
    yield server
    server.cleanup()


class TestEtcdContract(KVStoreContract):
    lease_ttl = 2.0  # etcd rounds shorter leases up

    @pytest.fixture
    async def new_client(self, etcd_plain, tmp_path):
        config = load_etcd_config(etcd_plain.client_config(tmp_path / "etcd.yaml"))
        async with client_factory(lambda: EtcdKVStore(config)) as make:
            yield make


class TestEtcdTLSContract(KVStoreContract):
    lease_ttl = 2.0

    @pytest.fixture
    async def new_client(self, etcd_tls, tmp_path):
        config = load_etcd_config(
            etcd_tls.client_config(tmp_path / "cluster2", key="trusted-ca-file"))
        async with client_factory(lambda: EtcdKVStore(config)) as make:
            yield make


async def test_failover_to_the_next_endpoint(etcd_plain, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "etcd.yaml").write_text(f"endpoints: ['{dead}', '{etcd_plain.url}']\n")
    client = EtcdKVStore(load_etcd_config(tmp_path / "etcd.yaml"))
    try:
        await client.put("failover/a", b"1")
        assert (await client.get("failover/a")).value == b"1"
        status = client.status()
        assert status.connected and etcd_plain.url in status.summary
        assert "1/2 connected" in status.summary and "3.4." in status.summary
    finally:
        await client.close()


async def test_wrong_ca_names_tls_verification(etcd_tls, tmp_path):
    import trustme
    path = etcd_tls.client_config(tmp_path / "cluster2", ca=trustme.CA())
    client = EtcdKVStore(load_etcd_config(path))
    with pytest.raises(KVStoreUnavailable, match="TLS"):
        await client.connect()
    assert "TLS" in client.status().summary and not client.status().connected
    await client.close()


async def test_unreachable_server_is_unavailable(tmp_path):
    (tmp_path / "etcd.yaml").write_text(f"endpoints: ['http://127.0.0.1:{free_port()}']\n")
    client = EtcdKVStore(load_etcd_config(tmp_path / "etcd.yaml"))
    with pytest.raises(KVStoreUnavailable):
        await client.get("x")
    await client.close()


async def test_watch_fails_when_the_server_stops_and_resumes_after_restart(tmp_path):
    server = EtcdServer("restart").start()
    client = EtcdKVStore(load_etcd_config(server.client_config(tmp_path / "etcd.yaml")))
    try:
        listing = await client.list_prefix("r/")
        watch = client.watch("r/", after_revision=listing.revision)
        await client.put("r/a", b"1")
        (first,) = await next_events(watch, 1)
        server.stop()
        with pytest.raises(KVStoreUnavailable):
            await next_events(watch, 1, timeout=20)
        server.start()
        writer = EtcdKVStore(load_etcd_config(server.client_config(tmp_path / "w.yaml")))
        await writer.put("r/b", b"2")
        await writer.close()
        for _ in range(50):  # reconnect with the contract: resume from the last revision
            try:
                (second,) = await next_events(client.watch("r/", after_revision=first.revision), 1)
                break
            except KVStoreUnavailable:
                await asyncio.sleep(0.2)
        assert (second.key, second.value) == ("r/b", b"2")
    finally:
        await client.close()
        server.cleanup()


async def test_compacted_revision_asks_for_a_relist(etcd_plain, tmp_path):
    client = EtcdKVStore(load_etcd_config(etcd_plain.client_config(tmp_path / "etcd.yaml")))
    try:
        first = await client.put("compact/a", b"1")
        await client.put("compact/a", b"2")
        last = await client.put("compact/a", b"3")
        await client._call(lambda c: c.compact(last))
        with pytest.raises(RevisionCompacted):
            await next_events(client.watch("compact/", after_revision=first), 1)
    finally:
        await client.close()


@pytest.mark.parametrize("text, message", [
    ("endpoints: []\n", "'endpoints' must be a non-empty list"),
    ("endpoints: ['ftp://x:1']\n", "is not http(s)://HOST:PORT"),
    ("endpoints: ['https://x:1']\ncert-file: /a\n", "'cert-file' and 'key-file' go together"),
    ("endpoints: ['http://x:1']\nca-file: /a\n", "TLS files given but no https:// endpoint"),
    ("endpoints: [\n", "not valid YAML"),
    ("- just a list\n", "expected a mapping"),
])
def test_bad_config_names_file_and_field(tmp_path, text, message):
    path = tmp_path / "cluster2"
    path.write_text(text)
    with pytest.raises(UsageError, match=f"etcd config {path}: .*{message}".replace("(", r"\(")
                       .replace(")", r"\)")):
        load_etcd_config(path)


def test_seed_clustermesh_file_parses(tmp_path):
    path = tmp_path / "cluster2"
    path.write_text(
        "endpoints:\n  - https://10.2.2.2:2379\n\n"
        "ca-file:   '/var/lib/cilium/clustermesh/cluster2-etcd-client-ca.crt'\n"
        "key-file:  '/var/lib/cilium/clustermesh/cluster2-etcd-client.key'\n"
        "cert-file: '/var/lib/cilium/clustermesh/cluster2-etcd-client.crt'\n")
    config = load_etcd_config(path)
    assert [(e.host, e.port, e.tls) for e in config.endpoints] == [("10.2.2.2", 2379, True)]
    assert str(config.trusted_ca_file).endswith("cluster2-etcd-client-ca.crt")
