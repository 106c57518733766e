"""meshagent-guardrails: the default policy resolver plus an operator's deny list.

A third-party policy resolver. It composes meshagent's default resolver through the
``PolicyResolver`` contract and adds peers no policy may allow: every identity a deny rule
selects is denied, in both directions, on every local endpoint, whatever the policies say.
The core feeds its output to whatever datapath is loaded, as it does for the default resolver.

    meshagent --plugins etcd,ebpf,guardrails --policy-resolver guardrails \\
        --guardrails-deny-file /etc/meshagent/deny.yaml

The deny file (YAML)::

    deny:
    - matchLabels: {role: contractor}                       # any source
    - matchLabels: {k8s:io.cilium.k8s.policy.cluster: cluster3}
"""

from pathlib import Path

import attrs
import yaml

import meshagent
from meshagent.plugin import (
    AgentView,
    ChangeKind,
    ChangeQueue,
    Controller,
    ControllerHandle,
    EndpointChanges,
    Health,
    Identity,
    MapChange,
    MapKey,
    MapState,
    PolicyResolver,
    PolicyUpdate,
    StatusSection,
    UsageError,
    Verdict,
    build_default_resolver,
)

DIRECTIONS = ("ingress", "egress")


@attrs.frozen
class DenyRule:
    """Peers whose labels include every ``key=value`` (a key without a source matches any)."""

    match_labels: tuple[tuple[str, str], ...]
    text: str  # as the operator wrote it, for status and trace

    def selects(self, labels: frozenset[str]) -> bool:
        return all(any(_label_matches(label, key, value) for label in labels)
                   for key, value in self.match_labels)


def _label_matches(label: str, key: str, value: str) -> bool:
    if ":" in key:  # the source is given (k8s:app): it must be that one
        return label == f"{key}={value}"
    return label.partition(":")[2] == f"{key}={value}"


def load_deny_file(path: Path | None) -> list[DenyRule]:
    """The rules of a deny file; UsageError naming the file and what is wrong."""
    if path is None:
        return []
    try:
        document = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"--guardrails-deny-file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--guardrails-deny-file {path}: not YAML: {exc}") from None
    if document is None:
        return []
    if not isinstance(document, dict) or set(document) - {"deny"}:
        raise UsageError(f"--guardrails-deny-file {path}: expected a mapping with one key,"
                         " 'deny'")
    rules = []
    for index, item in enumerate(document.get("deny") or []):
        where = f"--guardrails-deny-file {path}: deny[{index}]"
        if not isinstance(item, dict) or set(item) != {"matchLabels"} or \
                not isinstance(item["matchLabels"], dict) or not item["matchLabels"]:
            raise UsageError(f"{where}: expected {{matchLabels: {{key: value, ...}}}}")
        pairs = []
        for key, value in item["matchLabels"].items():
            if not isinstance(key, str) or not isinstance(value, (str, int, bool)) or \
                    isinstance(value, bool):
                raise UsageError(f"{where}: label {key!r}: {value!r} must be a string")
            pairs.append((key, str(value)))
        text = ", ".join(f"{k}={v}" for k, v in sorted(pairs))
        rules.append(DenyRule(tuple(sorted(pairs)), text))
    return rules


class Guardrails:
    """Meets :class:`meshagent.plugin.PolicyResolver` by wrapping another resolver: the rules
    the repository hands it go to the inner one."""

    def __init__(self, inner: PolicyResolver, rules: list[DenyRule]):
        self.inner = inner
        self.rules = rules
        self.denied: dict[int, DenyRule] = {}  # identity -> the first rule that denies it
        self.endpoints: set[int] = set()
        self.inner_state: dict[int, MapState] = {}  # the inner resolver's output, mirrored
        self.out: dict[int, MapState] = {}  # what we handed on
        self.pending = ChangeQueue()

    # -- what the inner resolver decides, delegated -----------------------------------------------

    async def apply(self, update: PolicyUpdate, revision: int) -> None:
        await self.inner.apply(update, revision)
        self.pending.touch()  # the revision grew: so does ours

    @property
    def revision(self) -> int:
        return self.inner.revision

    def enforcing(self) -> tuple[int, int]:
        return self.inner.enforcing()

    def trace(self, dst_endpoint: int, port: int, protocol: str = "TCP", **source) -> dict:
        result = self.inner.trace(dst_endpoint, port, protocol, **source)
        rule = self.denied.get(result["source"]["identity"])
        if rule is not None:
            result = {**result, "verdict": Verdict.DENY.value,
                      "reason": f"denied by guardrails (deny rule {rule.text}; was:"
                                f" {result['reason']})"}
        return result

    async def close(self) -> None:
        await self.inner.close()

    # -- the map state: the inner one, with the deny list on top ----------------------------------

    def snapshot(self) -> dict[int, MapState]:
        self.inner_state = {ep: dict(state) for ep, state in self.inner.snapshot().items()}
        self.endpoints |= set(self.inner_state)
        self.out = {ep: self._desired_state(ep) for ep in self.endpoints}
        self.pending.clear()
        return {ep: dict(state) for ep, state in self.out.items()}

    async def changes(self) -> EndpointChanges:
        return await self.pending.take()

    def _deny_keys(self, identity_id: int) -> list[MapKey]:
        return [MapKey(direction, identity_id, 0, 0, 0) for direction in DIRECTIONS]

    def _desired(self, endpoint_id: int, key: MapKey) -> Verdict | None:
        if key.protocol == 0 and key.port == 0 and key.identity in self.denied:
            return Verdict.DENY
        return self.inner_state.get(endpoint_id, {}).get(key)

    def _desired_state(self, endpoint_id: int) -> MapState:
        state = dict(self.inner_state.get(endpoint_id, {}))
        for identity_id in self.denied:
            for key in self._deny_keys(identity_id):
                state[key] = Verdict.DENY
        return state

    def _refresh(self, endpoint_id: int, keys) -> None:
        """Hand on how ``keys`` of an endpoint now differ from what was handed on."""
        out = self.out.setdefault(endpoint_id, {})
        changes = []
        for key in sorted(set(keys)):
            new = self._desired(endpoint_id, key)
            if out.get(key) == new:
                continue
            if new is None:
                del out[key]
                changes.append(MapChange(ChangeKind.DELETE, key, None))
            else:
                out[key] = new
                changes.append(MapChange(ChangeKind.UPSERT, key, new))
        self.pending.add(endpoint_id, changes)

    # -- inputs: the inner resolver's changes, identities and endpoints ---------------------------

    async def _follow_inner(self, handle: ControllerHandle) -> None:
        handle.ready()
        while True:
            for endpoint_id, changes in (await self.inner.changes()).items():
                if endpoint_id not in self.endpoints:
                    continue  # deleted meanwhile
                state = self.inner_state.setdefault(endpoint_id, {})
                for change in changes:
                    if change.verdict is None:
                        state.pop(change.key, None)
                    else:
                        state[change.key] = change.verdict
                self._refresh(endpoint_id, [c.key for c in changes])

    @meshagent.hookimpl
    def meshagent_controllers(self, agent):
        return [Controller("guardrails-follow", self._follow_inner)]

    @meshagent.hookimpl
    def meshagent_identity_changed(self, kind, identity: Identity):
        rule = next((r for r in self.rules if r.selects(identity.labels)), None) \
            if kind is ChangeKind.UPSERT else None
        if self.denied.get(identity.id) == rule:
            return
        if rule is None:
            del self.denied[identity.id]
        else:
            self.denied[identity.id] = rule
        for endpoint_id in self.endpoints:
            self._refresh(endpoint_id, self._deny_keys(identity.id))

    @meshagent.hookimpl
    def meshagent_endpoint_changed(self, kind, endpoint):
        if kind is ChangeKind.DELETE:
            self.endpoints.discard(endpoint.id)
            self.inner_state.pop(endpoint.id, None)
            self.out.pop(endpoint.id, None)
            self.pending.drop(endpoint.id)
        elif endpoint.id not in self.endpoints:
            self.endpoints.add(endpoint.id)
            self._refresh(endpoint.id, [k for i in self.denied for k in self._deny_keys(i)])
            self.pending.touch()  # (the contract: an added endpoint wakes changes())

    @meshagent.hookimpl
    def meshagent_status(self, verbose):
        summary = f"{len(self.rules)} deny rules, {len(self.denied)} identities denied"
        details = [f"deny {rule.text}" for rule in self.rules]
        if verbose:
            details += [f"denied identity {i}: {rule.text}" for i, rule in sorted(
                self.denied.items())]
        return StatusSection("Guardrails", Health.OK, summary, details=details)


@meshagent.hookimpl
def meshagent_addoption(parser):
    group = parser.getgroup("guardrails", "guardrails policy resolver (meshagent-guardrails)")
    group.addoption("guardrails-deny-file", type=str, default="",
                    help="YAML file of peers no policy may allow (deny: [{matchLabels: ...}])")


@meshagent.hookimpl
def meshagent_configure(config, pluginmanager):
    load_deny_file(Path(config.get("guardrails-deny-file")) if config.get(
        "guardrails-deny-file") else None)  # refuse a bad file before anything starts


@meshagent.hookimpl
def meshagent_register_policy_resolver(registry):
    registry.register("guardrails", build)


def build(agent: AgentView) -> Guardrails:
    """The default resolver, wrapped. Its events and controllers come from the agent as for
    any plugin; the wrapper registers itself for the identity and endpoint events it needs."""
    path = agent.config.get("guardrails-deny-file")
    guardrails = Guardrails(build_default_resolver(agent), load_deny_file(Path(path) if path else None))
    agent.plugins.register(guardrails, name="guardrails.resolver")
    return guardrails
