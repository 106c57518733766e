"""The eBPF datapath: keeps the pinned maps equal to what the agent resolved.

Batches of net changes (from the core's feed, its one caller) are applied one key at a time
(no flush-and-refill), in the order the datapath contract states. Until the agent has synced
(policies, identities, endpoints, remote clusters) nothing but endpoints is changed: a
restarted agent first finds the maps and attached programs as they were, then reconciles them
in one pass.
"""

import asyncio
import ctypes as ct
import logging
import functools
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import attrs

from meshagent import hookimpl
from meshagent.plugin import (
    DatapathBatch,
    Endpoint,
    FlowEventSink,
    FlowEvents,
    Health,
    IPCacheEntry,
    ProxyRoutes,
    StatusSection,
    verdict_metrics,
)
from meshagent.plugins.ebpf import loader, migrate
from meshagent.plugins.ebpf.events import EventReader, PerfRing
from meshagent.plugins.ebpf.maps import (
    BATCH_SIZE,
    CT_NAT_DST,
    CT_REPLY,
    DIR_EGRESS,
    DIR_INGRESS,
    ENDPOINT_HAS_IPV6,
    ENDPOINT_LOCAL_DELIVERY,
    ENDPOINT_POLICY_AUDIT,
    POLICY_PREFIX_STATIC,
    REASONS,
    VERDICT_NAMES,
    VERDICT_NUMBERS,
    EndpointInfo,
    IPCache6Key,
    IPCacheKey,
    IPCacheValue,
    IPv4Bytes,
    IPv6Bytes,
    LBBackend,
    LBBackendKey,
    LBService,
    LBServiceKey,
    PolicyKey,
    PolicyValue,
    bpf_lib,
    ip6_bytes,
    ip_bytes,
    mac_bytes,
    open_maps,
    possible_cpus,
    read_metrics,
)
from meshagent.plugins.ebpf.policymap import (
    Block,
    Keys,
    block_key,
    group_entries,
    ordered_writes,
    safe_stages,
)

log = logging.getLogger(__name__)

PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
DIRECTIONS = {"ingress": DIR_INGRESS, "egress": DIR_EGRESS}

#: One longest-prefix group of the policy map: (endpoint id, direction, identity or 0).
GroupKey = tuple[int, int, int]


@attrs.frozen
class EbpfSettings:
    """What the plugin's options decide: where maps are pinned, their sizes, CT lifetimes."""

    bpf_root: Path
    ipcache_max: int = 512000
    policy_max: int = 262144
    ct_tcp_max: int = 524288
    ct_any_max: int = 262144
    ct_timeout_tcp: float = 21600.0
    ct_timeout_any: float = 60.0
    flow_events: bool = True  # False (--enable-hubble=false): the programs report drops only
    event_pages: int = 64  # perf buffer pages per CPU and program (a power of two)
    event_wakeup: int = 256  # records in a ring that wake the agent (of ~2,700 in 64 pages)
    event_poll: float = 0.05  # seconds between reads of every ring (a lone record's wait)
    ct_timeout_close: float = 10.0  # a closing TCP connection's entries (Cilium's
    # CT_CLOSE_TIMEOUT)
    program_cache: Path | None = None  # compiled programs by content hash (None: always compile)

    @classmethod
    def from_config(cls, config) -> "EbpfSettings":
        return cls(Path(config.get("ebpf-bpf-root")), config.get("ebpf-ipcache-max"),
                   config.get("ebpf-policy-max"), config.get("ebpf-ct-tcp-max"),
                   config.get("ebpf-ct-any-max"), config.get("ebpf-ct-timeout-tcp"),
                   config.get("ebpf-ct-timeout-any"), config.get("enable-hubble"),
                   config.get("ebpf-event-pages"), program_cache=cls._program_cache(config))

    @staticmethod
    def _program_cache(config) -> Path | None:
        """Where compiled programs are kept: in the state dir unless told (as Cilium keeps its
        compiled templates in its state dir), none when the cache is off."""
        if not config.get("ebpf-program-cache"):
            return None
        return Path(config.get("ebpf-program-cache-dir") or config.state_dir / "bpf-programs")

    def defines(self) -> dict[str, int | str]:
        """The C constants the programs are compiled with."""
        return {
            "IPCACHE_MAX": self.ipcache_max,
            "POLICY_MAX": self.policy_max,
            "CT_TCP_MAX": self.ct_tcp_max,
            "CT_ANY_MAX": self.ct_any_max,
            "CT6_TCP_MAX": max(1024, self.ct_tcp_max // 4),
            "CT6_ANY_MAX": max(1024, self.ct_any_max // 4),
            "LB_SERVICES_MAX": 65536,
            "CT_LIFETIME_TCP_NS": f"{int(self.ct_timeout_tcp * 1e9)}ULL",
            "CT_LIFETIME_ANY_NS": f"{int(self.ct_timeout_any * 1e9)}ULL",
            "CT_CLOSE_TIMEOUT_NS": f"{int(self.ct_timeout_close * 1e9)}ULL",
            "FLOW_EVENTS": int(self.flow_events),
        }


def policy_map_key(group: GroupKey, block: Block) -> PolicyKey:
    endpoint_id, direction, identity = group
    return PolicyKey(POLICY_PREFIX_STATIC + block.bits, endpoint_id, identity, direction,
                     block.protocol, block.port)


def group_of(endpoint_id: int, key) -> GroupKey:
    """The group a resolver :class:`~meshagent.policy.resolver.MapKey` belongs to."""
    return (endpoint_id, DIRECTIONS[key.direction], key.identity)


def entries_for(keys: dict) -> dict[Block, str]:
    """One group's resolver keys and verdicts as the policy map's prefixes."""
    return group_entries((k.protocol, k.port, k.end_port, v.value) for k, v in keys.items())


def _as_keys(keys: dict) -> Keys:
    """Resolver MapKeys of one group as policymap keys."""
    return {(k.protocol, k.port, k.end_port): v.value for k, v in keys.items()}


class EbpfDatapath:
    """Meets :class:`meshagent.datapath.Datapath`; registered as ``ebpf``.

    ``events`` gets its flow events (``meshagent.datapath.events``); ``attacher`` puts the
    programs on a veth and ``proxy_routes`` routes packets marked for the DNS proxy to it
    (tests that run the programs on synthetic packets pass ones that do nothing).
    """

    def __init__(self, settings: EbpfSettings, events: FlowEventSink | None = None,
                 attacher: "loader.Attacher | None" = None, proxy_routes=None):
        self.settings = settings
        self.events = events if events is not None else FlowEvents()
        self.attacher = attacher or loader.TcAttacher()
        self.proxy_routes = proxy_routes or ProxyRoutes()
        self.routed = False  # the to-proxy rule and table are installed
        self.proxy_port = 0  # where the DNS proxy listens (0: no proxy)
        self.pin_dir = settings.bpf_root / "meshagent"
        self.defines = settings.defines()
        self.programs: dict[str, loader.PinnedProgram] = {}
        self.maps: dict = {}
        self.endpoints: dict[int, Endpoint] = {}
        self.attached: dict[int, list[str]] = {}  # endpoint id -> programs seen on its veth
        self.groups: dict[GroupKey, dict] = {}  # group -> {MapKey: Verdict} the resolver wants
        self.installed: dict[GroupKey, dict[Block, str]] = {}  # group -> what the map holds
        self.generation = 0  # endpoint generations: bumped when verdicts may have changed
        self.replaced_maps: list[str] = []  # pinned maps of another layout, started afresh
        self.programs_cached = False  # loaded from the program cache, no compiler run
        self.deferred: set[int] = set()  # endpoints whose programs wait for the first sync
        self.previous: "migrate.PreviousMaps | None" = None  # the last agent's, if replaced
        self.pinned_endpoints: dict[int, EndpointInfo] = {}  # ifindex -> as the last left it
        self.born: dict[int, int] = {}  # endpoint id -> the generation it was added at
        self.service_ids: dict[tuple, int] = {}  # (vip, port, proto) -> service id
        self.synced = False
        self.started = False
        self.start_error = ""
        self._reader = EventReader(self.events)
        self._poller: asyncio.Task | None = None
        self._event_maps: list[int] = []

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            loader.ensure_bpffs(self.settings.bpf_root)
            self.pin_dir.mkdir(exist_ok=True)
            self.previous = migrate.open_previous(self.pin_dir)  # before the compile unpins
            loaded = await loader.load_programs(self.pin_dir, self.defines,
                                                self.settings.program_cache)
            self.replaced_maps, self.programs_cached = loaded.replaced, loaded.cached
            self.programs = {name: loader.PinnedProgram(self.pin_dir, name)
                             for name in loader.PROGRAMS}
        except loader.DatapathError as exc:
            self.start_error = str(exc)
            if self.previous is not None:
                self.previous.close()
            raise
        self.maps = open_maps(self.pin_dir)
        self.pinned_endpoints = {key.value: info for key, info in self.maps["endpoints"].items()}
        # generations only grow, also across restarts: a connection judged by an earlier
        # agent is judged again
        last = self.maps["generation"].get(ct.c_uint32(0))
        self.generation = max([last.value if last else 0]
                              + [max(i.generation, i.born) for i in self.pinned_endpoints.values()])
        self._next_generation()
        self._open_flow_events()
        self.started = True
        if self.replaced_maps:
            log.warning("pinned maps of another layout started afresh: %s (programs already"
                        " attached keep their old maps until the first sync)",
                        ", ".join(self.replaced_maps))
        log.info("eBPF programs loaded%s; maps pinned under %s",
                 " from the program cache" if self.programs_cached else "", self.pin_dir)

    def _open_flow_events(self) -> None:
        """A perf ring per CPU on each program's pinned event array, read in the loop when the
        kernel says ``event_wakeup`` records are in one, and all of them every
        ``event_poll`` seconds (a lone record waits at most that). The programs never wait
        for room: what a full ring could not take reaches the sink's ``lost``."""
        lib = bpf_lib()
        loop = asyncio.get_running_loop()
        for name in loader.PROGRAMS:
            map_fd = lib.bpf_obj_get(str(self.pin_dir / f"events_{name}").encode())
            if map_fd < 0:
                raise loader.DatapathError(f"cannot open the pinned event array of {name}")
            # keep it open: the kernel drops perf entries when the map file that set them closes
            self._event_maps.append(map_fd)
            for cpu in range(possible_cpus()):
                try:
                    ring = PerfRing(cpu, self.settings.event_pages, self.settings.event_wakeup)
                except OSError as exc:
                    raise loader.DatapathError(f"no perf ring for flow events: {exc}") from None
                self._reader.rings.append(ring)
                key, value = ct.c_int(cpu), ct.c_int(ring.fd)
                if lib.bpf_update_elem(map_fd, ct.byref(key), ct.byref(value), 0) != 0:
                    raise loader.DatapathError(f"cannot register the flow event reader of"
                                               f" {name} on CPU {cpu}")
                loop.add_reader(ring.fd, self._reader.read, ring)
        self._poller = asyncio.create_task(self._poll_events(), name="ebpf-flow-events")

    async def _poll_events(self) -> None:
        while True:
            await asyncio.sleep(self.settings.event_poll)
            try:
                self._reader.read_all()
            except Exception:
                log.exception("reading flow events failed")

    async def stop(self) -> None:
        """Stop reading events; programs and pinned maps stay for the next agent, the
        to-proxy routing goes (the proxy stops with the agent; the next one routes again once
        its proxy listens)."""
        loop = asyncio.get_running_loop()
        if self.routed:
            await asyncio.to_thread(self.proxy_routes.remove)
            self.routed = False
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for ring in self._reader.rings:
            loop.remove_reader(ring.fd)
        self._reader.close()
        for map_fd in self._event_maps:
            os.close(map_fd)
        self._event_maps.clear()
        for program in self.programs.values():
            program.close()
        for pinned in self.maps.values():
            pinned.close()
        if self.previous is not None:
            self.previous.close()

    # -- endpoints ------------------------------------------------------------------------------

    def _next_generation(self) -> int:
        """A generation no earlier one had (kept in the pinned ``generation`` map)."""
        self.generation += 1
        self.maps["generation"].put(ct.c_uint32(0), ct.c_uint32(self.generation))
        return self.generation

    def _write_endpoint(self, endpoint: Endpoint) -> None:
        flags = ENDPOINT_LOCAL_DELIVERY if endpoint.pod_mac and endpoint.host_mac else 0
        if endpoint.ipv6 is not None:
            flags |= ENDPOINT_HAS_IPV6
        if endpoint.policy_audit:
            flags |= ENDPOINT_POLICY_AUDIT
        info = EndpointInfo(endpoint.id, endpoint.identity, ip_bytes(endpoint.ipv4),
                            self.generation, endpoint.ifindex, mac_bytes(endpoint.pod_mac),
                            mac_bytes(endpoint.host_mac), flags, self.born[endpoint.id],
                            ip6_bytes(endpoint.ipv6))
        self.maps["endpoints"].put(ct.c_uint32(endpoint.ifindex), info)

    # -- batches ----------------------------------------------------------------------------------

    async def apply(self, batch: DatapathBatch) -> None:
        """Apply a batch in the contract's order: endpoints added; the touched policy groups
        tightened to what the old and new state both allow, the ipcache changed (upserts,
        then deletes), the new policy; the services; endpoints removed. One generation bump
        at the end: tracked connections of the endpoints whose verdicts may have changed (all
        of them when the ipcache changed) are judged again on their next packet."""
        for endpoint in batch.added:
            await self._add_endpoint(endpoint)
        before: dict[GroupKey, Keys] = {}
        after: dict[GroupKey, Keys] = {}
        for endpoint_id, changes in batch.policy.items():
            old, new = self._change_groups(endpoint_id, changes)
            before.update(old)
            after.update(new)
        ipcache = bool(batch.ipcache_upserts or batch.ipcache_deletes)
        if before:
            self._step_groups(before, after, between=lambda: self._write_ipcache(
                batch.ipcache_upserts, batch.ipcache_deletes))
        elif ipcache:  # no group to step through (most remote updates): the ipcache alone
            self._write_ipcache(batch.ipcache_upserts, batch.ipcache_deletes)
        if before or ipcache:
            self._bump(list(self.endpoints) if ipcache else list(batch.policy))
        if batch.services is not None:
            self._update_services(batch.services)
        if batch.proxy_port is not None:
            await self._set_proxy_port(batch.proxy_port)
        for endpoint in batch.removed:
            self._remove_endpoint(endpoint)

    async def _set_proxy_port(self, port: int) -> None:
        """Where redirected packets go: the routing first, so that no packet is marked for
        a proxy the node would forward; without a proxy, no routing."""
        if port and not self.routed:
            await asyncio.to_thread(self.proxy_routes.install)
            self.routed = True
        self.maps["proxy_port"].put(ct.c_uint32(0), ct.c_uint32(port))
        self.proxy_port = port
        if not port and self.routed:
            await asyncio.to_thread(self.proxy_routes.remove)
            self.routed = False

    async def _add_endpoint(self, endpoint: Endpoint) -> None:
        held = self.endpoints.get(endpoint.id)
        if held is not None and (held.ifindex, held.ipv4) != (endpoint.ifindex, endpoint.ipv4):
            self._drop_endpoint_rows(held)  # changed where it lives: its old rows go
        restoring = not self.synced and self.replaced_maps and await asyncio.to_thread(
            self.attacher.attached, endpoint.ifindex)
        pinned = self.pinned_endpoints.pop(endpoint.ifindex, None)
        if pinned is not None and pinned.endpoint_id == endpoint.id and \
                bytes(pinned.ipv4) == endpoint.ipv4.packed:
            born = pinned.born  # the same endpoint after a restart: its connections are its own
        elif restoring and "endpoints" in self.replaced_maps:
            born = 0  # the same, across a layout change: so are those carried over
        else:  # a new endpoint: what conntrack holds under its id belonged to another
            born = self._next_generation()
        self.born[endpoint.id] = born
        self.endpoints[endpoint.id] = endpoint
        if held is not None and held.policy_audit != endpoint.policy_audit:
            # what it tracked was judged in the other mode: judged again (audited
            # connections are cut once audit mode is off)
            self._next_generation()
        self._write_endpoint(endpoint)
        self.maps["local_ips"].put(ip_bytes(endpoint.ipv4), ct.c_uint32(endpoint.ifindex))
        if restoring:
            # the programs there use the maps of an earlier layout, which hold the last
            # agent's state: they keep enforcing it until the new maps are filled
            self.deferred.add(endpoint.id)
        else:
            await asyncio.to_thread(self.attacher.attach, endpoint.ifindex, self.programs)
        # read back what the kernel has, so status reports attachments, not intentions
        self.attached[endpoint.id] = await asyncio.to_thread(self.attacher.attached,
                                                             endpoint.ifindex)

    def _drop_endpoint_rows(self, endpoint: Endpoint) -> None:
        local = self.maps["local_ips"].get(ip_bytes(endpoint.ipv4))
        if local is not None and local.value == endpoint.ifindex:
            self.maps["local_ips"].delete(ip_bytes(endpoint.ipv4))
        self.maps["endpoints"].delete(ct.c_uint32(endpoint.ifindex))

    def _remove_endpoint(self, endpoint: Endpoint) -> None:
        self._drop_endpoint_rows(endpoint)
        self.endpoints.pop(endpoint.id, None)
        self.born.pop(endpoint.id, None)
        self.attached.pop(endpoint.id, None)
        self.deferred.discard(endpoint.id)
        for group in [g for g in self.groups.keys() | self.installed.keys()
                      if g[0] == endpoint.id]:
            self.groups.pop(group, None)
            self._write_group(group, {})  # its veth is going: no order to keep

    def _bump(self, endpoint_ids: Iterable[int]) -> None:
        """Verdicts of these endpoints may have changed: their tracked connections are judged
        again on their next packet (after the maps were written). With no endpoint to judge
        again no generation is spent (a remote update on a node without pods writes its
        ipcache row alone)."""
        endpoint_ids = list(endpoint_ids)
        if not endpoint_ids:
            return
        self._next_generation()
        for endpoint_id in endpoint_ids:
            endpoint = self.endpoints.get(endpoint_id)
            if endpoint is not None:
                self._write_endpoint(endpoint)

    # -- ipcache and policy -----------------------------------------------------------------------

    def _write_ipcache(self, upserts: Iterable[IPCacheEntry],
                       deletes: Iterable[IPCacheEntry]) -> None:
        """Upserts before deletes: as a batch holds each prefix once, every address resolves
        to its old or its new identity on the way, never to a shorter prefix's for a moment."""
        for entry in upserts:
            name, key = _ipcache_row(entry)
            self.maps[name].put(key, IPCacheValue(entry.identity, 0))
        for entry in deletes:
            name, key = _ipcache_row(entry)
            self.maps[name].delete(key)

    def _change_groups(self, endpoint_id: int, changes) -> tuple[dict[GroupKey, Keys],
                                                                  dict[GroupKey, Keys]]:
        """Take one endpoint's map changes into ``groups``; the touched groups' keys before
        and after."""
        before: dict[GroupKey, dict] = {}
        for change in changes:
            group = group_of(endpoint_id, change.key)
            keys = self.groups.setdefault(group, {})
            before.setdefault(group, dict(keys))
            if change.verdict is None:
                keys.pop(change.key, None)
            else:
                keys[change.key] = change.verdict
        after = {group: self.groups.get(group, {}) for group in before}
        for group in [g for g, keys in after.items() if not keys]:
            self.groups.pop(group, None)
        return ({g: _as_keys(keys) for g, keys in before.items()},
                {g: _as_keys(keys) for g, keys in after.items()})

    def _step_groups(self, old: dict[GroupKey, Keys], new: dict[GroupKey, Keys],
                     between=None) -> None:
        """Take these groups from ``old`` to ``new`` keys through the safe stages, every
        group stage by stage (``between`` runs after the tightening stages)."""
        stages = {group: safe_stages(old.get(group, {}), new.get(group, {}))
                  for group in old.keys() | new.keys()}
        for index in range(3):
            if index == 2 and between is not None:
                between()
            for group in sorted(stages):
                self._write_group(group, group_entries(
                    (protocol, port, end, verdict)
                    for (protocol, port, end), verdict in stages[group][index].items()))

    def _write_group(self, group: GroupKey, wanted: dict[Block, str]) -> None:
        """Make one group's entries ``wanted``, write by write in an order where every packet
        meets its verdict of before or of after (policymap.ordered_writes)."""
        table = self.maps["policy"]
        for block, verdict in ordered_writes(self.installed.get(group, {}), wanted):
            key = policy_map_key(group, block)
            if verdict is None:
                table.delete(key)
            else:
                table.put(key, _policy_value(verdict, block))
        if wanted:
            self.installed[group] = wanted
        else:
            self.installed.pop(group, None)

    def _read_installed(self) -> dict[GroupKey, dict[Block, str]]:
        """The policy map's entries as the last agent left them, by group."""
        installed: dict[GroupKey, dict[Block, str]] = {}
        for key, value in self.maps["policy"].items():
            group = (key.endpoint_id, key.direction, key.identity)
            block = Block(key.prefixlen - POLICY_PREFIX_STATIC, key.protocol, key.port)
            verdict = VERDICT_NAMES.get(value.verdict, "deny")
            installed.setdefault(group, {})[block] = verdict
            if value.prefix != block.bits:  # written when the byte held a match type
                self.maps["policy"].put(key, _policy_value(verdict, block))
        return installed

    async def reconcile(self, policies: dict[int, dict], ipcache: list[IPCacheEntry]) -> None:
        """Make the maps exactly this (first sync after start), taking what the last agent
        left through the same safe stages as any change: policy tightened to what both the
        old and the new state allow, then the ipcache (new rows before stale ones go), then
        the new policy — no packet of an allowed connection meets a half-updated state, and
        none that both states deny passes."""
        self.groups = {}
        for endpoint_id, verdicts in policies.items():
            for key, verdict in verdicts.items():
                self.groups.setdefault(group_of(endpoint_id, key), {})[key] = verdict
        self.installed = self._read_installed()
        old = {group: {block_key(b): v for b, v in entries.items()}
               for group, entries in self.installed.items()}
        self._step_groups(old, {g: _as_keys(keys) for g, keys in self.groups.items()},
                          between=lambda: self._replace_ipcache(ipcache))
        live = {e.ifindex for e in self.endpoints.values()}
        for key, _ in list(self.maps["endpoints"].items()):
            if key.value not in live:
                self.maps["endpoints"].delete(key)
        local = {e.ipv4.packed: e.ifindex for e in self.endpoints.values()}
        for key, ifindex in list(self.maps["local_ips"].items()):
            if local.get(bytes(key)) != ifindex.value:
                self.maps["local_ips"].delete(key)
        self._bump(list(self.endpoints))
        if self.previous is not None:
            carried = migrate.carry(self.previous, self.maps)
            self.previous.close()
            self.previous = None
            log.info("carried %d tracked connections over from the previous map layout", carried)
        for endpoint_id in sorted(self.deferred):
            endpoint = self.endpoints[endpoint_id]
            await asyncio.to_thread(self.attacher.attach, endpoint.ifindex, self.programs)
            self.attached[endpoint_id] = await asyncio.to_thread(self.attacher.attached,
                                                                 endpoint.ifindex)
        self.deferred.clear()
        self.synced = True
        log.info("eBPF maps reconciled: %d ipcache entries, %d endpoints, %d policy entries",
                 len(ipcache), len(policies), self.policy_entry_count())

    def _replace_ipcache(self, ipcache: list[IPCacheEntry]) -> None:
        """The ipcache exactly these rows: new ones first, then stale ones removed, so every
        address resolves to its old or its new identity on the way. What the maps held
        before is read first (on a first start, next to nothing): nothing of the size of
        the rows is built, as a remote cluster may publish a million."""
        before = {name: {bytes(key) for key in self.maps[name].keys()}
                  for name in ("ipcache", "ipcache6")}
        self._put_ipcache(ipcache, before)
        for name, stale in before.items():
            table = self.maps[name]
            for key in stale:
                table.delete(table.key_type.from_buffer_copy(key))

    def _put_ipcache(self, entries: Iterable[IPCacheEntry],
                     written: dict[str, set[bytes]] | None = None) -> None:
        """Write these rows, in order, family by family, BATCH_SIZE at a time (the keys and
        values built for one batch only); each key written leaves ``written``'s set of its
        map."""
        rows: dict[str, tuple[list[bytes], list[bytes]]] = {"ipcache": ([], []),
                                                            "ipcache6": ([], [])}

        def flush(name: str) -> None:
            keys, values = rows[name]
            self.maps[name].put_many(keys, values)
            if written is not None:
                written[name].difference_update(keys)
            keys.clear()
            values.clear()
        for entry in entries:
            name = "ipcache" if len(entry.key) == 5 else "ipcache6"
            keys, values = rows[name]
            keys.append(_PREFIXLEN[entry.key[0]] + entry.key[1:])
            values.append(_ipcache_value(entry.identity))
            if len(keys) >= BATCH_SIZE:
                flush(name)
        for name, (keys, _) in rows.items():
            if keys:
                flush(name)

    # -- connections (ReportsConnections) ------------------------------------------------------

    async def connected_peers(self) -> dict[int, frozenset]:
        """Per endpoint, the peers of its tracked connections it opened (leaving the pod)
        whose entries have not expired: read from the conntrack maps, in a thread."""
        return await asyncio.to_thread(self._connected_peers)

    def _connected_peers(self) -> dict[int, frozenset]:
        import ipaddress
        import time
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        lifetimes = {True: self.settings.ct_timeout_tcp * 1e9,
                     False: self.settings.ct_timeout_any * 1e9}
        peers: dict[int, set] = {}
        for name in ("ct_tcp", "ct_any", "ct6_tcp", "ct6_any"):
            lifetime = lifetimes[name.endswith("tcp")]
            for key, value in self.maps[name].items():
                if value.flags & CT_REPLY or key.direction != DIR_EGRESS or \
                        now - value.last_seen_ns > lifetime:
                    continue
                raw = value.nat_ip if value.flags & CT_NAT_DST else key.daddr
                peers.setdefault(key.endpoint_id, set()).add(ipaddress.ip_address(bytes(raw)))
        return {endpoint: frozenset(addresses) for endpoint, addresses in peers.items()}

    def policy_entry_count(self) -> int:
        """Entries the policy map holds for the resolved verdicts (as written)."""
        return sum(len(entries) for entries in self.installed.values())

    # -- services -------------------------------------------------------------------------------

    def _update_services(self, services) -> None:
        """Make the load-balancer maps match the merged services: backends first, then the
        service entries that point at them, then what is stale (new connections never meet a
        service without its backends)."""
        wanted: dict[tuple, list] = {}
        for merged in services:
            for frontend, backends in merged.balanced():
                key = (frontend.ip.packed, frontend.port, PROTOCOL_NUMBERS[frontend.protocol])
                wanted[key] = backends
        for key in wanted:
            self.service_ids.setdefault(key, max(self.service_ids.values(), default=0) + 1)
        services_map, backends_map = self.maps["lb_services"], self.maps["lb_backends"]
        for key, backends in wanted.items():
            service_id = self.service_ids[key]
            for slot, backend in enumerate(backends):
                backends_map.put(LBBackendKey(service_id, slot),
                                 LBBackend(ip_bytes(backend.ip), backend.port, 0))
            services_map.put(LBServiceKey(IPv4Bytes(*key[0]), key[1], key[2], 0),
                             LBService(service_id, len(backends)))
        counts = {self.service_ids[k]: len(b) for k, b in wanted.items()}
        for key, _ in list(services_map.items()):
            if (bytes(key.vip), key.port, key.protocol) not in wanted:
                services_map.delete(key)
        for key, _ in list(backends_map.items()):
            if key.slot >= counts.get(key.service_id, 0):
                backends_map.delete(key)
        self.service_ids = {k: v for k, v in self.service_ids.items() if k in wanted}

    # -- flow events ----------------------------------------------------------------------------

    def read_events(self) -> None:
        """Hand what the perf rings hold to the sink now, without waiting for the loop (a
        program run with BPF_PROG_TEST_RUN has written its events once the run returns)."""
        self._reader.read_all()

    # -- visibility -----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return {REASONS.get(r, str(r)): packets for r, (packets, _) in
                read_metrics(self.maps["metrics"]).items()}

    @hookimpl
    def meshagent_status(self, verbose):
        if not self.started:
            if self.start_error:
                return StatusSection("Datapath", Health.FAILURE,
                                     f"ebpf: NOT enforcing: {self.start_error}")
            return StatusSection("Datapath", Health.WARNING, "ebpf: loading programs")
        attached = {ep_id: self.attached.get(ep_id, []) for ep_id in self.endpoints}
        full = sum(1 for names in attached.values() if len(names) == 2)
        limits = {"ipcache": "IPCACHE_MAX", "ipcache6": "IPCACHE_MAX", "policy": "POLICY_MAX",
                  "ct_tcp": "CT_TCP_MAX", "ct_any": "CT_ANY_MAX", "ct6_tcp": "CT6_TCP_MAX",
                  "ct6_any": "CT6_ANY_MAX", "lb_services": "LB_SERVICES_MAX"}
        # counting a map walks its keys (a million in the ipcache): only for details
        sizes = ({name: len(self.maps[name]) for name in limits if name != "policy"}
                 if verbose else {})
        sizes["policy"] = self.policy_entry_count()
        drops = {reason: n for reason, n in self.counters().items() if reason != "forwarded"}
        summary = (f"ebpf: programs attached on {full}/{len(self.endpoints)} endpoints,"
                   f" {'synced' if self.synced else 'waiting for the agent to sync'};"
                   f" drops: " + (", ".join(f"{n} {r}" for r, n in drops.items() if n) or "none"))
        details = [f"map {name}: {count}/{self.defines[limits[name]]}"
                   for name, count in sizes.items()]
        details += [f"endpoint {ep_id}: {', '.join(names) or 'NOT ATTACHED'}"
                    for ep_id, names in sorted(attached.items())]
        details += [f"endpoint {ep_id}: keeps the programs of an earlier map layout until the"
                    " first sync" for ep_id in sorted(self.deferred)]
        health = Health.OK if full == len(self.endpoints) else Health.WARNING
        return StatusSection("Datapath", health, summary, details=details)


def _policy_value(verdict: str, block: Block) -> PolicyValue:
    """An entry's value: its verdict and its prefix length (which names the match type)."""
    return PolicyValue(VERDICT_NUMBERS[verdict], block.bits)


class DatapathMetrics:
    """Packets and bytes per verdict reason, read from the pinned metrics map when scraped
    (Cilium's ``drop_count_total``/``forward_count_total``, under meshagent's prefix)."""

    def __init__(self, datapath: EbpfDatapath):
        self.datapath = datapath

    def collect(self):
        if not self.datapath.started:
            return
        yield from verdict_metrics(
            (REASONS[reason], packets, size) for reason, (packets, size)
            in sorted(read_metrics(self.datapath.maps["metrics"]).items()) if reason in REASONS)

    def describe(self):
        return []


#: an ipcache key's head: the prefix length as the u32 of struct ipcache_key (and ipcache6_key)
_PREFIXLEN = [struct.pack("=I", length) for length in range(129)]


_IPCACHE_VALUE = struct.Struct("=II")  # struct ipcache_value: identity, flags


@functools.lru_cache(maxsize=65536)  # one object per identity, not per row
def _ipcache_value(identity: int) -> bytes:
    """struct ipcache_value of an identity (flags 0), as IPCacheValue lays it out."""
    return _IPCACHE_VALUE.pack(identity, 0)


def _ipcache_row(entry: IPCacheEntry) -> tuple[str, IPCacheKey | IPCache6Key]:
    """The map of the entry's family (each has an LPM trie of its own) and its key there."""
    if entry.version == 6:
        return "ipcache6", IPCache6Key(entry.prefixlen, IPv6Bytes.from_buffer_copy(entry.packed))
    return "ipcache", IPCacheKey(entry.prefixlen, IPv4Bytes.from_buffer_copy(entry.packed))
