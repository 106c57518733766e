"""The eBPF datapath: keeps the pinned maps equal to what the agent resolved.

Changes are applied one key at a time (no flush-and-refill). Until the agent has synced
(policies, identities, endpoints, remote clusters) nothing is changed: a restarted agent first
finds the maps and attached programs as they were, then reconciles them in one pass.
"""

import asyncio
import collections
import ctypes as ct
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from meshagent import hookimpl
from meshagent.api import Route
from meshagent.endpoint import Endpoint
from meshagent.events import ChangeKind
from meshagent.ipcache import IPCacheEntry
from meshagent.plugins.ebpf import loader
from meshagent.plugins.ebpf.maps import (
    DIR_EGRESS, DIR_INGRESS, PROTOCOL_NAMES, REASONS, VERDICT_ALLOW, VERDICT_DENY, DropEvent,
    EndpointInfo, IPCacheKey, IPCacheValue, IPv4Bytes, LBBackend, LBBackendKey, LBService,
    LBServiceKey, PolicyKey, PolicyValue, ip_bytes, ip_text, open_maps,
)
from meshagent.status import Health, StatusSection

if TYPE_CHECKING:
    from meshagent.agent import Agent

log = logging.getLogger(__name__)

PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PORT_RANGE_MAX = 1024  # a range becomes one policy entry per port; larger ones are refused
RECENT_DROPS = 1000
TCP_FLAGS = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"))


def policy_keys(endpoint_id: int, key) -> list[tuple]:
    """A resolver MapKey as the policy map's exact-port entries."""
    direction = DIR_INGRESS if key.direction == "ingress" else DIR_EGRESS
    ports = [0] if key.port == 0 else range(key.port, key.end_port + 1)
    return [(endpoint_id, key.identity, port, key.protocol, direction) for port in ports]


class EbpfDatapath:
    """Meets :class:`meshagent.datapath.Datapath`; registered as ``ebpf``."""

    def __init__(self, agent: "Agent"):
        self.agent = agent
        config = agent.config
        self.root = Path(config.get("ebpf-bpf-root"))
        self.pin_dir = self.root / "meshagent"
        self.defines = {
            "IPCACHE_MAX": config.get("ebpf-ipcache-max"),
            "POLICY_MAX": config.get("ebpf-policy-max"),
            "CT_TCP_MAX": config.get("ebpf-ct-tcp-max"),
            "CT_ANY_MAX": config.get("ebpf-ct-any-max"),
            "LB_SERVICES_MAX": 65536,
            "CT_LIFETIME_TCP_NS": f"{int(config.get('ebpf-ct-timeout-tcp') * 1e9)}ULL",
            "CT_LIFETIME_ANY_NS": f"{int(config.get('ebpf-ct-timeout-any') * 1e9)}ULL",
        }
        self.programs: dict[str, tuple] = {}
        self.maps: dict = {}
        self.endpoints: dict[int, Endpoint] = {}
        self.attached: dict[int, list[str]] = {}  # endpoint id -> programs seen on its veth
        self.desired: dict[int, dict] = {}  # endpoint id -> {MapKey: Verdict}
        self.covering: dict[tuple, set] = {}  # policy map key -> MapKeys that expand to it
        self.refused: dict[str, str] = {}
        self.service_ids: dict[tuple, int] = {}  # (vip, port, proto) -> service id
        self.synced = False
        self.started = False
        self.start_error = ""
        self.recent_drops: collections.deque = collections.deque(maxlen=RECENT_DROPS)
        self.subscribers: set[asyncio.Queue] = set()
        self._readers: list[tuple[int, int]] = []
        self._event_maps: list[int] = []
        agent.plugins.register(self, name="ebpf.datapath")

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            loader.ensure_bpffs(self.root)
            self.pin_dir.mkdir(exist_ok=True)
            await loader.compile_in_child(self.pin_dir, self.defines)
            self.programs = {name: loader.PinnedProgram(self.pin_dir, name)
                             for name in loader.PROGRAMS}
        except loader.DatapathError as exc:
            self.start_error = str(exc)
            raise
        self.maps = open_maps(self.pin_dir)
        self._open_drop_events()
        self.started = True
        log.info("eBPF programs loaded; maps pinned under %s", self.pin_dir)

    def _open_drop_events(self) -> None:
        """One perf reader per CPU on each program's pinned event array, read in the loop."""
        from bcc.libbcc import bcc_perf_buffer_opts, lib
        from bcc.table import _LOST_CB_TYPE, _RAW_CB_TYPE

        from meshagent.plugins.ebpf.maps import possible_cpus
        loop = asyncio.get_running_loop()
        callback = _RAW_CB_TYPE(lambda _, data, size: self._on_drop(0, data, size))
        lost = ct.cast(None, _LOST_CB_TYPE)
        self._callbacks = (callback, lost)  # ctypes callbacks must outlive the readers
        for name in loader.PROGRAMS:
            map_fd = lib.bpf_obj_get(str(self.pin_dir / f"events_{name}").encode())
            if map_fd < 0:
                raise loader.DatapathError(f"cannot open the pinned event array of {name}")
            for cpu in range(possible_cpus()):
                opts = bcc_perf_buffer_opts()
                opts.pid, opts.cpu, opts.wakeup_events = -1, cpu, 1  # wake on every event
                reader = lib.bpf_open_perf_buffer_opts(callback, lost, None, 16, ct.byref(opts))
                if not reader:
                    raise loader.DatapathError("could not open a perf buffer for drop events")
                fd = lib.perf_reader_fd(reader)
                key, value = ct.c_int(cpu), ct.c_int(fd)
                if lib.bpf_update_elem(map_fd, ct.byref(key), ct.byref(value), 0) != 0:
                    raise loader.DatapathError(f"cannot register the drop event reader of"
                                               f" {name} on CPU {cpu}")
                loop.add_reader(fd, lib.perf_reader_event_read, reader)
                self._readers.append((fd, reader))
            # keep it open: the kernel drops perf entries when the map file that set them closes
            self._event_maps.append(map_fd)

    async def stop(self) -> None:
        """Stop reading events; programs and pinned maps stay for the next agent."""
        from bcc.libbcc import lib
        loop = asyncio.get_running_loop()
        for fd, reader in self._readers:
            loop.remove_reader(fd)
            lib.perf_reader_free(reader)
        self._readers.clear()
        for map_fd in self._event_maps:
            os.close(map_fd)
        self._event_maps.clear()
        for program in self.programs.values():
            program.close()
        for pinned in self.maps.values():
            pinned.close()

    # -- endpoints ------------------------------------------------------------------------------

    async def endpoint_added(self, endpoint: Endpoint) -> None:
        self.endpoints[endpoint.id] = endpoint
        info = EndpointInfo(endpoint.id, endpoint.identity, ip_bytes(endpoint.ipv4), 0)
        self.maps["endpoints"].put(ct.c_uint32(endpoint.ifindex), info)
        await asyncio.to_thread(loader.attach, endpoint.ifindex, self.programs)
        # read back what the kernel has, so status reports attachments, not intentions
        self.attached[endpoint.id] = await asyncio.to_thread(loader.attached, endpoint.ifindex)

    async def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.maps["endpoints"].delete(ct.c_uint32(endpoint.ifindex))
        self.endpoints.pop(endpoint.id, None)
        self.attached.pop(endpoint.id, None)
        for key in list(self.desired.get(endpoint.id, {})):
            self._set_policy(endpoint.id, key, None)
        self.desired.pop(endpoint.id, None)

    # -- ipcache and policy -----------------------------------------------------------------------

    async def update_ipcache(self, changes) -> None:
        table = self.maps["ipcache"]
        for kind, entry in changes:
            key = IPCacheKey(entry.prefix.prefixlen, ip_bytes(entry.prefix.network_address))
            if kind is ChangeKind.DELETE:
                table.delete(key)
            else:
                table.put(key, IPCacheValue(entry.identity, 0))

    async def update_policy(self, endpoint_id: int, changes) -> None:
        for change in changes:
            self._set_policy(endpoint_id, change.key, change.verdict)

    def _set_policy(self, endpoint_id: int, key, verdict) -> None:
        desired = self.desired.setdefault(endpoint_id, {})
        if verdict is None:
            desired.pop(key, None)
        else:
            desired[key] = verdict
        expanded = policy_keys(endpoint_id, key)
        if len(expanded) > PORT_RANGE_MAX:
            where = f"endpoint {endpoint_id} ports {key.port}-{key.end_port}"
            if verdict is None:
                self.refused.pop(where, None)
            else:
                self.refused[where] = (f"range of {len(expanded)} ports is larger than"
                                       f" {PORT_RANGE_MAX}: not installed (traffic stays denied)")
                log.error("%s: %s", where, self.refused[where])
            return
        for pk in expanded:
            covering = self.covering.setdefault(pk, set())
            if verdict is None:
                covering.discard(key)
            else:
                covering.add(key)
            self._write_policy_entry(endpoint_id, pk)

    def _write_policy_entry(self, endpoint_id: int, pk: tuple) -> None:
        verdicts = {self.desired.get(endpoint_id, {}).get(k) for k in self.covering.get(pk, ())}
        verdicts.discard(None)
        key = PolicyKey(*pk)
        if not verdicts:
            self.covering.pop(pk, None)
            self.maps["policy"].delete(key)
            return
        value = VERDICT_DENY if any(v.value == "deny" for v in verdicts) else VERDICT_ALLOW
        self.maps["policy"].put(key, PolicyValue(value))

    async def reconcile(self, policies: dict[int, dict], ipcache: list[IPCacheEntry]) -> None:
        """Make the maps exactly this (first sync after start), make-before-break: new policy
        entries first, then the ipcache, and only then remove what is stale — so no packet of
        an allowed connection meets a half-updated state."""
        self.desired.clear()
        self.covering.clear()
        for endpoint_id, verdicts in policies.items():
            for key, verdict in verdicts.items():
                self._set_policy(endpoint_id, key, verdict)
        wanted = {(e.prefix.prefixlen, e.prefix.network_address.packed): e for e in ipcache}
        await self.update_ipcache([(ChangeKind.UPSERT, e) for e in ipcache])
        for key, _ in list(self.maps["ipcache"].items()):
            if (key.prefixlen, bytes(key.ip)) not in wanted:
                self.maps["ipcache"].delete(key)
        for key, _ in list(self.maps["policy"].items()):
            pk = (key.endpoint_id, key.identity, key.port, key.protocol, key.direction)
            if pk not in self.covering:
                self.maps["policy"].delete(key)
        live = {e.ifindex for e in self.endpoints.values()}
        for key, _ in list(self.maps["endpoints"].items()):
            if key.value not in live:
                self.maps["endpoints"].delete(key)
        self.synced = True
        log.info("eBPF maps reconciled: %d ipcache entries, %d endpoints", len(ipcache),
                 len(policies))

    # -- services -------------------------------------------------------------------------------

    async def update_services(self, services) -> None:
        """Make the load-balancer maps match the merged services: backends first, then the
        service entries that point at them, then what is stale (new connections never meet a
        service without its backends)."""
        wanted: dict[tuple, list] = {}
        for merged in services:
            for frontend in merged.service.frontends:
                backends = [b for b in merged.backends if b.protocol == frontend.protocol]
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

    # -- drop events ----------------------------------------------------------------------------

    def _on_drop(self, cpu, data, size) -> None:
        raw = ct.cast(data, ct.POINTER(DropEvent)).contents
        event = self.describe_drop(raw)
        self.recent_drops.append(event)
        for queue in list(self.subscribers):
            if queue.qsize() < 10000:
                queue.put_nowait(event)

    def describe_drop(self, raw: DropEvent) -> dict:
        def who(identity: int) -> dict:
            known = self.agent.tables.identities.get(identity)
            cluster = known.cluster if known else ("reserved" if identity < 256 else "?")
            return {"identity": identity, "cluster": cluster}
        flags = [name for bit, name in TCP_FLAGS if raw.tcp_flags & bit] if raw.protocol == 6 \
            else []
        return {
            "type": "drop", "time": time.time(), "reason": REASONS.get(raw.reason, raw.reason),
            "endpoint": raw.endpoint_id,
            "direction": "ingress" if raw.direction == DIR_INGRESS else "egress",
            "source": {"ip": ip_text(raw.saddr), "port": raw.sport, **who(raw.src_identity)},
            "destination": {"ip": ip_text(raw.daddr), "port": raw.dport,
                            **who(raw.dst_identity)},
            "protocol": PROTOCOL_NAMES.get(raw.protocol, str(raw.protocol)),
            "tcp_flags": flags,
        }

    # -- visibility -----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        from meshagent.plugins.ebpf.commands import read_metrics
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
        sizes = {name: len(self.maps[name]) for name in ("ipcache", "policy", "ct_tcp",
                                                         "ct_any", "lb_services")}
        limits = {"ipcache": "IPCACHE_MAX", "policy": "POLICY_MAX", "ct_tcp": "CT_TCP_MAX",
                  "ct_any": "CT_ANY_MAX", "lb_services": "LB_SERVICES_MAX"}
        drops = {reason: n for reason, n in self.counters().items() if reason != "forwarded"}
        summary = (f"ebpf: programs attached on {full}/{len(self.endpoints)} endpoints,"
                   f" {'synced' if self.synced else 'waiting for the agent to sync'};"
                   f" drops: " + (", ".join(f"{n} {r}" for r, n in drops.items() if n) or "none"))
        details = [f"map {name}: {count}/{self.defines[limits[name]]}"
                   for name, count in sizes.items()]
        details += [f"endpoint {ep_id}: {', '.join(names) or 'NOT ATTACHED'}"
                    for ep_id, names in sorted(attached.items())]
        details += [f"refused {where}: {why}" for where, why in sorted(self.refused.items())]
        health = Health.OK if full == len(self.endpoints) and not self.refused else \
            Health.WARNING
        return StatusSection("Datapath", health, summary, details=details)

    @hookimpl
    def meshagent_api_routes(self):
        return [Route("GET", "/monitor", self._monitor)]

    async def _monitor(self, request: web.Request) -> web.StreamResponse:
        import json
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(queue)
        try:
            while True:
                event = await queue.get()
                await response.write((json.dumps(event) + "\n").encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.subscribers.discard(queue)
        return response
