"""The etcd v3 client behind the kvstore contract, on aetcd.

aetcd speaks gRPC to one endpoint over a plaintext channel; this module adds what the agent
needs on top: TLS with a CA and a client certificate, failover across several endpoints, the
revision of every listing (for list-then-watch), and errors mapped onto the contract's.
"""

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's C core logs to stderr otherwise

import aetcd  # noqa: E402
import grpc  # noqa: E402
from aetcd import exceptions as etcd_errors  # noqa: E402
from aetcd import rpc  # noqa: E402
from aetcd import transactions as txn  # noqa: E402
from aetcd.client import _handle_errors  # noqa: E402
from aetcd.utils import prefix_range_end  # noqa: E402

from meshagent.plugin import (  # noqa: E402
    EventType,
    KVStoreError,
    KVStoreStatus,
    KVStoreUnavailable,
    KeyValue,
    Lease,
    LeaseExpired,
    Listing,
    RevisionCompacted,
    WatchEvent,
    check_distinct,
    kv_lock,
)
from meshagent.plugins.etcd.config import Endpoint, EtcdConfig  # noqa: E402

ETCD_PAGE_SIZE = 50_000  # keys per page when a caller does not say: see list_pages

log = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_TIMEOUT = 5.0
CHANNEL_OPTIONS = {
    # a remote cluster's full listing (100k ipcache entries) is one response
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
    # notice a dead peer on an idle connection (etcd allows pings every 5 s); without the
    # http2 settings gRPC throttles pings to one a minute and two without data, and a hung
    # server is never noticed
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.http2.min_time_between_pings_ms": 10_000,
    "grpc.http2.min_ping_interval_without_data_ms": 5_000,
    # reconnect attempts are ours (failover, backoff); keep gRPC's short
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
    # one client, one connection: gRPC would otherwise share a connection between every
    # client of one process dialing the same server, and closing or failing over one client
    # would reach into the others
    "grpc.use_local_subchannel_pool": 1,
}
# keys per Txn of create_many / put_many, for etcd's default --max-txn-ops of 128: it bounds a
# Txn's ops, and a nested Txn's ops (here 1) by what its parent leaves (128 - 127 = 1)
TXN_CHUNK = 127
PUT = rpc.Event.EventType.PUT
_CONNECTION_ERRORS = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
                      asyncio.TimeoutError)


class _Client(aetcd.Client):
    """aetcd's client with an optional TLS channel."""

    def __init__(self, endpoint: Endpoint, credentials: grpc.ChannelCredentials | None):
        super().__init__(host=endpoint.host, port=endpoint.port, timeout=REQUEST_TIMEOUT,
                         options=CHANNEL_OPTIONS)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        options = list(self._options.items())
        if self._credentials is None:
            self.channel = rpc.insecure_channel(target, options=options)
        else:
            self.channel = rpc.secure_channel(target, self._credentials, options=options)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel), timeout=None,
                                              metadata=self.metadata)
        self.watchstub = rpc.WatchStub(self.channel)
        self._connected.set()

    @_handle_errors
    async def open_watch(self, prefix: bytes, start_revision: int):
        """A watch of ``prefix`` on a gRPC stream of its own, once etcd created it: the stream
        and its first response. Read raw, a response's events are taken in one go where
        aetcd's watcher passes each through a queue and a task switch of their own."""
        await self.connect()
        call = self.watchstub.Watch(metadata=self.metadata)
        try:
            await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=prefix, range_end=prefix_range_end(prefix), start_revision=start_revision)))
            created = await call.read()
        except BaseException:
            call.cancel()
            raise
        if created is grpc.aio.EOF:
            raise etcd_errors.ConnectionFailedError("watch stream ended before it was created")
        return call, created

    @_handle_errors  # gRPC errors as aetcd's, as its own calls raise them
    async def range_page(self, start: bytes, end: bytes, limit: int, revision: int):
        """One page of a range read at ``revision`` (0: the latest); aetcd's get_prefix has
        neither a limit nor a revision."""
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
        return await self.kvstub.Range(request, timeout=self._timeout, metadata=self.metadata)

    @_handle_errors
    async def batch_txn(self, ops: list):
        """A Txn that always runs ``ops``, answered raw: aetcd's ``transaction`` drops the
        header (the revision) and converts every response, which a batch does not need."""
        request = rpc.TxnRequest(compare=[], success=self._ops_to_requests(ops), failure=[])
        return await self.kvstub.Txn(request, timeout=self._timeout, metadata=self.metadata)


def describe_error(exc: BaseException, endpoint: "Endpoint | None" = None) -> str:
    """A one-line reason, naming TLS verification when that is what failed, and a plaintext
    client talking to a TLS server (which just closes the socket)."""
    text = str(exc) or type(exc).__name__
    rpc_error = exc if isinstance(exc, grpc.aio.AioRpcError) else exc.__cause__
    if isinstance(rpc_error, grpc.aio.AioRpcError):
        text = rpc_error.details() or text
    lowered = text.lower()
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return f"TLS verification of the server certificate failed ({text.strip()})"
    if "handshake" in lowered or "ssl" in lowered or "tls" in lowered:
        return f"TLS handshake failed ({text.strip()})"
    if isinstance(exc, asyncio.TimeoutError | etcd_errors.ConnectionTimeoutError):
        return f"timed out ({text})"
    if endpoint is not None and not endpoint.tls and "socket closed" in lowered:
        return (f"the server closed the connection ({text.strip()}): does it want TLS? The"
                f" endpoint is {endpoint.url}; use https:// with a CA (trusted-ca-file)")
    return text.strip()


class EtcdKVStore:
    """One client of one etcd cluster; meets :class:`meshagent.kvstore.KVStore`."""

    def __init__(self, config: EtcdConfig):
        self.config = config
        self._credentials = self._load_credentials(config)
        self._index = 0
        self._client: _Client | None = None
        self._connect_lock = asyncio.Lock()
        self.closed = False
        self.server_version = ""
        self.is_leader = False
        self.last_error = ""
        self.leases: set[int] = set()

    @staticmethod
    def _load_credentials(config: EtcdConfig) -> grpc.ChannelCredentials | None:
        if not any(e.tls for e in config.endpoints):
            return None
        # Read once per client: a changed clustermesh file makes a new client, which is how
        # rotated certificates are picked up.
        def read(path):
            try:
                return path.read_bytes() if path else None
            except OSError as exc:
                raise KVStoreError(f"etcd config {config.source}: cannot read {path}:"
                                   f" {exc.strerror}") from None
        return grpc.ssl_channel_credentials(read(config.trusted_ca_file),
                                            read(config.key_file), read(config.cert_file))

    @property
    def endpoint(self) -> Endpoint:
        return self.config.endpoints[self._index % len(self.config.endpoints)]

    # -- connection and failover ----------------------------------------------------------------

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._client is not None:
                return
            if self.closed:
                raise KVStoreUnavailable("client is closed")
            reasons = []
            for _ in self.config.endpoints:
                endpoint = self.endpoint
                client = _Client(endpoint, self._credentials if endpoint.tls else None)
                try:
                    status = await asyncio.wait_for(self._status(client), REQUEST_TIMEOUT)
                except (etcd_errors.ClientError, grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
                    reasons.append(f"{endpoint.url}: {describe_error(exc, endpoint)}")
                    await client.close()
                    self._index += 1
                    continue
                self._client = client
                self.server_version, self.is_leader = status
                self.last_error = ""
                log.debug("connected to etcd %s (%s)", endpoint.url, self.server_version)
                return
            self.last_error = "; ".join(reasons)
            raise KVStoreUnavailable(self.last_error)

    @staticmethod
    async def _status(client: _Client) -> tuple[str, bool]:
        """The server's version and whether it leads: proves the endpoint answers."""
        await client.connect()
        response = await client.maintenancestub.Status(rpc.StatusRequest(),
                                                        timeout=REQUEST_TIMEOUT)
        return response.version, response.leader == response.header.member_id

    async def _drop(self, exc: BaseException) -> None:
        """Forget the current endpoint after a connection error; the next call fails over."""
        self.last_error = f"{self.endpoint.url}: {describe_error(exc, self.endpoint)}"
        client, self._client = self._client, None
        self._index += 1
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2)

    async def _call(self, op: Callable[[_Client], Awaitable[T]]) -> T:
        """Run ``op`` on a connected client, failing over once per endpoint."""
        for _ in self.config.endpoints:
            await self.connect()
            client = self._client
            try:
                return await op(client)
            except _CONNECTION_ERRORS as exc:
                if self._client is client:
                    await self._drop(exc)
        raise KVStoreUnavailable(self.last_error)

    # -- key-value ------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        result = await self._call(lambda c: c.get(key.encode()))
        return _kv(result) if result is not None else None

    async def list_prefix(self, prefix: str) -> Listing:
        result = await self._call(lambda c: c.get_prefix(prefix.encode(), sort_target="key"))
        return Listing([_kv(kv) for kv in result], result.header.revision)

    async def list_pages(self, prefix: str, page_size: int = ETCD_PAGE_SIZE
                         ) -> AsyncIterator[Listing]:
        """Ranges of ``page_size`` keys, each from after the last key of the one before, all
        at the revision of the first. The default is larger than the contract's: etcd 3.4
        walks every key left in the range for each page (to count them), so small pages make
        a listing quadratic (1,080,005 keys: 9.3 s in pages of 10,000, 4.8 s of 50,000)."""
        start, end = prefix.encode(), aetcd.utils.prefix_range_end(prefix.encode())

        async def page(start: bytes, revision: int):
            try:
                return await self._call(
                    lambda c: c.range_page(start, end, page_size, revision))
            except etcd_errors.ClientError as exc:
                if revision and "compacted" in str(exc):
                    # the oldest revision kept is not said; it is past this one
                    raise RevisionCompacted(revision, revision + 1) from None
                raise

        response = await page(start, 0)  # the first page reads the latest
        revision = response.header.revision
        while True:
            following = None
            if response.more and response.kvs:
                # asked for now, so that etcd reads the next page while this one is applied
                following = asyncio.ensure_future(page(response.kvs[-1].key + b"\0", revision))
            try:
                yield Listing([_kv(kv) for kv in response.kvs], revision)
            except BaseException:
                if following is not None:
                    following.cancel()
                raise
            if following is None:
                return
            response = await following

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        result = await self._leased(lambda c: c.put(key.encode(), value, lease=_lease_id(lease)))
        return result.header.revision

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        return await self._txn(key, [txn.Create(key.encode()) == 0],
                               [txn.Put(key.encode(), value, lease=_lease_id(lease))])

    async def update_if(self, key: str, value: bytes, *, mod_revision: int,
                        lease: Lease | None = None) -> bool:
        return await self._txn(key, [txn.Mod(key.encode()) == mod_revision],
                               [txn.Put(key.encode(), value, lease=_lease_id(lease))])

    async def delete(self, key: str) -> bool:
        result = await self._call(lambda c: c.delete(key.encode()))
        return result is not None

    async def delete_if(self, key: str, *, mod_revision: int) -> bool:
        return await self._txn(key, [txn.Mod(key.encode()) == mod_revision],
                               [txn.Delete(key.encode())])

    async def delete_prefix(self, prefix: str) -> int:
        result = await self._call(lambda c: c.delete_prefix(prefix.encode()))
        return result.deleted

    async def create_many(self, items: Sequence[tuple[str, bytes]], *,
                          lease: Lease | None = None) -> list[KeyValue | None]:
        """Each key a nested Txn: create if absent, else read."""
        def create(key: bytes, value: bytes, lease_id: int | None):
            return txn.Txn(compare=[txn.Create(key) == 0],
                           success=[txn.Put(key, value, lease=lease_id)],
                           failure=[txn.Get(key)])

        def answers(response) -> list[KeyValue | None]:
            return [None if r.response_txn.succeeded
                    else _kv(r.response_txn.responses[0].response_range.kvs[0])
                    for r in response.responses]
        parts = await self._in_txns(items, lease, create, answers)
        return [result for part in parts for result in part]

    async def put_many(self, items: Sequence[tuple[str, bytes]], *,
                       lease: Lease | None = None) -> int:
        revisions = await self._in_txns(
            items, lease, lambda key, value, lease_id: txn.Put(key, value, lease=lease_id),
            lambda response: response.header.revision)
        return max(revisions, default=0)

    async def _in_txns(self, items: Sequence[tuple[str, bytes]], lease: Lease | None,
                       op: Callable, answer: Callable[[object], T]) -> list[T]:
        """``op(key, value, lease id)`` for every item, one Txn per chunk of TXN_CHUNK keys,
        the chunks side by side; ``answer`` of each chunk's response, in order."""
        check_distinct(items)
        lease_id = _lease_id(lease)

        async def chunk(part):
            ops = [op(key.encode(), value, lease_id) for key, value in part]

            async def run(client):
                return answer(await client.batch_txn(ops))
            return await self._leased(run)
        return list(await asyncio.gather(*(chunk(items[i:i + TXN_CHUNK])
                                           for i in range(0, len(items), TXN_CHUNK))))

    async def _txn(self, key: str, compare: list, success: list) -> bool:
        async def run(client):
            succeeded, _ = await client.transaction(compare=compare, success=success, failure=[])
            return succeeded
        return await self._leased(run)

    async def _leased(self, op: Callable[[_Client], Awaitable[T]]) -> T:
        try:
            return await self._call(op)
        except etcd_errors.ClientError as exc:
            if "lease not found" in str(exc):
                raise LeaseExpired(str(exc)) from None
            raise KVStoreError(describe_error(exc)) from exc

    # -- watch ----------------------------------------------------------------------------------

    async def watch(self, prefix: str, *, after_revision: int) -> AsyncIterator[WatchEvent]:
        call, response = await self._call(lambda c: c.open_watch(prefix.encode(),
                                                                  after_revision + 1))
        client = self._client
        try:
            while response is not grpc.aio.EOF:
                if response.compact_revision:
                    raise RevisionCompacted(after_revision, response.compact_revision)
                if response.canceled:
                    raise etcd_errors.ClientError(f"watch canceled: {response.cancel_reason}")
                for event in response.events:
                    kv = event.kv
                    if event.type == PUT:
                        yield WatchEvent(EventType.PUT, decode_key(kv.key), kv.value,
                                         kv.mod_revision)
                    else:
                        yield WatchEvent(EventType.DELETE, decode_key(kv.key), None,
                                         kv.mod_revision)
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as exc:
                    etcd_errors._handle_exception(exc)  # as aetcd's own calls raise it
        except etcd_errors.ClientError as exc:
            if self.closed:  # its channel went: the stream with it
                raise KVStoreUnavailable("client is closed") from None
            if self._client is client:
                await self._drop(exc)
            raise KVStoreUnavailable(f"watch of {prefix} lost: {self.last_error}") from None
        finally:
            call.cancel()
        if self.closed:
            raise KVStoreUnavailable("client is closed")
        # the server ended the stream without an error
        if self._client is client:
            await self._drop(ConnectionError("watch stream ended"))
        raise KVStoreUnavailable(f"watch of {prefix} ended: {self.last_error}")

    # -- leases ---------------------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> Lease:
        granted = await self._call(lambda c: c.lease(max(1, math.ceil(ttl))))
        self.leases.add(granted.id)
        return Lease(granted.id, float(granted.ttl))

    async def keepalive(self, lease: Lease) -> None:
        reply = await self._call(lambda c: c.refresh_lease(lease.id))
        if reply is None or reply.TTL <= 0:
            self.leases.discard(lease.id)
            raise LeaseExpired(f"lease {lease.id:x} is gone")

    async def revoke(self, lease: Lease) -> None:
        self.leases.discard(lease.id)
        try:
            await self._call(lambda c: c.revoke_lease(lease.id))
        except etcd_errors.ClientError as exc:
            if "lease not found" not in str(exc):
                raise KVStoreError(describe_error(exc)) from exc

    def lock(self, name: str):
        return kv_lock(self, name)

    # -- status and shutdown --------------------------------------------------------------------

    def status(self) -> KVStoreStatus:
        total = len(self.config.endpoints)
        connected = self._client is not None and not self.closed
        if connected:
            leader = " (Leader)" if self.is_leader else ""
            summary = (f"etcd: 1/{total} connected, leases={len(self.leases)},"
                       f" has-quorum=true: {self.endpoint.url} - {self.server_version}{leader}")
        else:
            state = "closed" if self.closed else (self.last_error or "not connected yet")
            summary = f"etcd: 0/{total} connected, has-quorum=false: {state}"
        details = tuple(f"endpoint {e.url}" for e in self.config.endpoints)
        return KVStoreStatus(connected, summary, details,
                             tuple(e.host for e in self.config.endpoints))

    async def close(self) -> None:
        self.closed = True
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2)


def decode_key(raw: bytes) -> str:
    """etcd keys are bytes; ours are UTF-8. Bytes that are not decode to surrogates, so that
    the key still reaches the sync, which rejects and counts it instead of stopping on it."""
    return raw.decode("utf-8", "surrogateescape")


def _kv(kv) -> KeyValue:
    return KeyValue(decode_key(kv.key), kv.value, kv.mod_revision, kv.create_revision,
                    kv.lease or None)


def _lease_id(lease: Lease | None) -> int:
    return lease.id if lease is not None else 0
