"""CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (cilium.io/v2): model and validation.

Documents come as YAML or JSON, one or many. Everything meshagent enforces is parsed into attrs
classes; anything it would not enforce (L7 rules, toFQDNs, named ports, …) is rejected with the
document, the field path and the reason — never silently ignored.
"""

import ipaddress
import json
import re
from typing import Any

import attrs
import yaml

from meshagent.errors import UsageError
from meshagent.fqdn import matchpattern
from meshagent.fqdn.contract import FQDNSelector
from meshagent.model.net import Network
from meshagent.policy import icmp

API_VERSION = "cilium.io/v2"
CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
#: Protocol names as policies and traces say them, and their numbers: a ``toPorts`` entry may
#: name the first four (pkg/policy/api/l4.go: "Matching on ICMP is not supported"); ICMP and
#: ICMPv6 are the protocols of ``icmps`` rules.
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ANY": 0, "ICMP": 1, "ICMPv6": 58}
PORT_PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY")
ENTITIES = ("world", "cluster", "host", "remote-node", "all", "health", "init", "unmanaged",
            "kube-apiserver")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_INGRESS_PEERS = {"fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet", "fromNodes"}
_EGRESS_PEERS = {"toEndpoints", "toEntities", "toCIDR", "toCIDRSet", "toServices", "toNodes"}
#: The L3 members of an ingress/egress rule, at most one kind per rule (Cilium's l3Members in
#: pkg/policy/api/rule_validation.go), in the order the error names them.
_INGRESS_MEMBERS = ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "fromNodes",
                    "fromGroups")
_EGRESS_MEMBERS = ("toCIDR", "toCIDRSet", "toEndpoints", "toEntities", "toServices",
                   "toGroups", "toNodes", "toFQDNs")
#: The members whose combination with another is refused. meshagent has always accepted
#: fromEndpoints/fromEntities/fromCIDR/fromCIDRSet (and the to- forms) together, resolving
#: them as the union of their peers, and its random policy worlds (the datapath differential
#: suite) rely on that; the members added since are held to Cilium's rule.
_EXCLUSIVE_MEMBERS = {"toFQDNs", "toServices", "fromNodes", "toNodes"}
#: L7 rule kinds of a port rule besides dns, refused by name
_L7_KINDS = {"http": "HTTP", "kafka": "Kafka", "l7proto": "generic L7 (l7proto)",
             "l7": "generic L7 (l7proto)"}
MAX_FQDN_LENGTH = 255  # the CRD's maxLength of matchName and matchPattern
_MATCH_NAME_CHARS = re.compile(r"^[-a-zA-Z0-9_.]+$")  # allowedMatchNameChars
_MATCH_PATTERN_CHARS = re.compile(r"^[-a-zA-Z0-9_.*]+$")  # allowedPatternChars
_UNSUPPORTED = {
    "fromRequires": "fromRequires", "toRequires": "toRequires",
    "fromGroups": "cloud groups", "toGroups": "cloud groups",
    "authentication": "mutual authentication", "nodeSelector": "host policies",
    "rules": "L7 rules", "serverNames": "TLS SNI rules", "terminatingTLS": "TLS termination",
    "originatingTLS": "TLS origination", "listener": "Envoy listeners",
    "cidrGroupRef": "CIDR groups", "toCIDRGroupRef": "CIDR groups",
}


class PolicyError(UsageError):
    """A policy document is invalid or uses something meshagent does not enforce."""


#: Cilium's preflight warning for a top-level description (warnTopLevelDescriptionField).
TOP_LEVEL_DESCRIPTION = ("It seems you have a policy with a top-level description. This field"
                         " is no longer supported. Please migrate your policy's description"
                         " field under `spec` or `specs`.")
#: Cilium's error (pkg/policy/api/rule_validation.go) for node peers without the option.
NODE_SELECTOR_LABELS_OFF = ("FromNodes/ToNodes rules can only be applied when the"
                            " \"enable-node-selector-labels\" flag is set")


def split_key(key: str) -> tuple[str | None, str]:
    """A selector key's label source (None: any) and bare key, as Cilium reads them
    (pkg/labels ParseSource with ':', via GetExtendedKeyFrom): ``k8s:app`` is k8s's ``app``;
    ``app`` and ``any:app`` are any source's; ``$host`` and ``reserved.host`` (no ``:``) are
    ``reserved:host``."""
    if key.startswith("$"):
        return "reserved", key[1:]
    source, sep, rest = key.partition(":")
    if not sep:
        if key.startswith("reserved."):
            return "reserved", key.removeprefix("reserved.")
        return None, key
    return (source if source and source != "any" else None), rest


@attrs.frozen(cache_hash=True)
class Requirement:
    key: str  # as written, maybe with a source prefix (k8s:app)
    operator: str
    values: frozenset[str] = frozenset()

    @property
    def source(self) -> str | None:
        return split_key(self.key)[0]

    @property
    def bare_key(self) -> str:
        return split_key(self.key)[1]


#: The sources under which Cilium's policy parser looks for the labels it adds when a selector
#: lacks them (namespace, namespace labels, cluster): ``k8s:`` or none (any).
_K8S_OR_ANY = (None, "k8s")


@attrs.frozen(cache_hash=True)
class EndpointSelector:
    requirements: tuple[Requirement, ...] = ()

    def names(self, bare_key: str) -> bool:
        return any(r.bare_key == bare_key for r in self.requirements)

    def has_key(self, bare_key: str, source: str | None = "k8s") -> bool:
        """Whether a requirement (any operator) is on ``bare_key`` of ``source``; for ``k8s``
        also when written without a source. Cilium's ``HasKey`` on ``k8s.<key>`` and
        ``any.<key>`` (``reserved.<key>`` for ``source="reserved"``)."""
        sources = _K8S_OR_ANY if source == "k8s" else (source,)
        return any(r.bare_key == bare_key and r.source in sources for r in self.requirements)

    def has_key_prefix(self, prefix: str) -> bool:
        """Whether a requirement is on a ``k8s:`` or source-less key starting with ``prefix``:
        Cilium's ``HasKeyPrefix`` on ``k8s.<prefix>`` and ``any.<prefix>``."""
        return any(r.bare_key.startswith(prefix) and r.source in _K8S_OR_ANY
                   for r in self.requirements)

    def has_source(self, source: str) -> bool:
        """Whether a requirement is on a label of ``source``: Cilium's ``HasKeyPrefix`` on
        ``<source>.``."""
        return any(r.source == source for r in self.requirements)

    def with_requirement(self, requirement: Requirement) -> "EndpointSelector":
        return EndpointSelector(tuple(sorted(self.requirements + (requirement,),
                                             key=lambda r: (r.key, r.operator))))


@attrs.frozen
class PortProtocol:
    port: int  # 0: any port; for ICMP and ICMPv6 the type (an ``icmps`` rule)
    end_port: int  # == port unless a range
    protocol: str  # TCP, UDP, SCTP, ANY, ICMP, ICMPv6


@attrs.frozen
class DNSPortRule:
    """A ``toPorts`` item with ``rules: dns``: its ports go to the DNS proxy, which lets
    through the questions ``rules`` match (either field of an item matching)."""

    ports: tuple[PortProtocol, ...]
    rules: tuple[FQDNSelector, ...]


@attrs.frozen
class CIDRRule:
    """A CIDR of either family; its excepts are of the same family and inside it."""

    cidr: Network
    excepts: tuple[Network, ...] = ()


@attrs.frozen
class ServiceRef:
    """One ``toServices`` item: a Service by name (``k8sService``) or by its labels
    (``k8sServiceSelector``), in ``namespace`` ("": any namespace, as in Cilium)."""

    namespace: str = ""
    name: str | None = None  # k8sService.serviceName
    selector: EndpointSelector | None = None  # k8sServiceSelector.selector

    def describe(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "any namespace"
        if self.name is not None:
            return f"service {self.name} in {where}"
        if self.selector is None:
            return "no service (an empty toServices item)"
        labels = ", ".join(f"{r.key} {r.operator} {sorted(r.values)}".rstrip(" []")
                           for r in self.selector.requirements)
        return f"services labelled {{{labels}}} in {where}"


@attrs.frozen
class PeerRule:
    """One item of an ingress/egress (or deny) section: peers AND ports.

    ``services`` are the item's ``toServices``; the repository translates them into peers
    for the resolver (:mod:`meshagent.policy.services`), which it adds to ``endpoints`` and
    ``cidrs`` as Cilium adds its generated selectors and CIDRs."""

    endpoints: tuple[EndpointSelector, ...] | None = None  # None: not given
    entities: tuple[str, ...] | None = None
    cidrs: tuple[CIDRRule, ...] | None = None
    ports: tuple[PortProtocol, ...] = ()  # of every toPorts item, the DNS ones' too
    services: tuple[ServiceRef, ...] | None = None
    fqdns: tuple[FQDNSelector, ...] | None = None  # toFQDNs (egress only)
    dns: tuple[DNSPortRule, ...] = ()  # the toPorts items with rules: dns (egress only)
    nodes: tuple[EndpointSelector, ...] | None = None  # fromNodes / toNodes

    @property
    def names_peers(self) -> bool:
        return any(x is not None for x in (self.endpoints, self.entities, self.cidrs,
                                           self.services, self.fqdns, self.nodes))

    @property
    def plain_ports(self) -> tuple[PortProtocol, ...]:
        """:attr:`ports` without those of the DNS items: the ports it simply allows."""
        if not self.dns:
            return self.ports
        out = list(self.ports)
        for rule in self.dns:
            for port in rule.ports:
                out.remove(port)
        return tuple(out)


@attrs.frozen
class RuleLabel:
    """One of a rule's ``labels`` (Cilium's labels.Label): metadata that names the rule, never
    matched against endpoints."""

    key: str
    value: str = ""
    source: str = "unspec"

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}" if self.value else \
            f"{self.source}:{self.key}"

    def to_json(self) -> dict:
        """Cilium's JSON of a label: ``value`` left out when empty."""
        out = {"key": self.key}
        if self.value:
            out["value"] = self.value
        out["source"] = self.source
        return out


#: The label keys Cilium derives for a rule from its policy (pkg/k8s/apis/cilium.io/const.go).
POLICY_LABEL_DERIVED_FROM = "io.cilium.k8s.policy.derived-from"
POLICY_LABEL_NAME = "io.cilium.k8s.policy.name"
POLICY_LABEL_NAMESPACE = "io.cilium.k8s.policy.namespace"
POLICY_LABEL_UID = "io.cilium.k8s.policy.uid"


@attrs.frozen
class Rule:
    endpoint_selector: EndpointSelector
    ingress: tuple[PeerRule, ...] = ()
    ingress_deny: tuple[PeerRule, ...] = ()
    egress: tuple[PeerRule, ...] = ()
    egress_deny: tuple[PeerRule, ...] = ()
    default_deny_ingress: bool | None = None  # None: on when the rule has ingress rules
    default_deny_egress: bool | None = None
    description: str = ""
    labels: tuple[RuleLabel, ...] = ()  # as written in the spec, not the derived ones

    @property
    def uses_nodes(self) -> bool:
        return any(item.nodes is not None for section in (
            self.ingress, self.ingress_deny, self.egress, self.egress_deny) for item in section)

    def enforces(self, direction: str) -> bool:
        explicit = self.default_deny_ingress if direction == "ingress" else self.default_deny_egress
        if explicit is not None:
            return explicit
        if direction == "ingress":
            return bool(self.ingress or self.ingress_deny)
        return bool(self.egress or self.egress_deny)


@attrs.frozen
class Policy:
    kind: str
    name: str
    namespace: str | None  # None for a clusterwide policy
    rules: tuple[Rule, ...]
    # the document as given, as JSON: what is stored, and read back only when asked for
    document_json: str = attrs.field(eq=False, repr=False, default="{}")
    uid: str = ""  # metadata.uid, when the document has one (Kubernetes gives one)
    # a top-level description, as Cilium's older examples put it: Kubernetes prunes it (the
    # CRD's schema has no such field) and Cilium's preflight check warns; kept here only
    description: str = ""

    def rule_labels(self, rule: Rule) -> tuple[RuleLabel, ...]:
        """The rule's labels as Cilium's CNP parser makes them (ParseToCiliumLabels in
        pkg/k8s/apis/cilium.io/utils/utils.go): the policy's (GetPolicyLabels: derived-from,
        name, namespace unless clusterwide, uid; source k8s) and the rule's own, sorted by
        key."""
        derived = [RuleLabel(POLICY_LABEL_DERIVED_FROM, self.kind, "k8s"),
                   RuleLabel(POLICY_LABEL_NAME, self.name, "k8s")]
        if self.namespace is not None:
            derived.append(RuleLabel(POLICY_LABEL_NAMESPACE, self.namespace, "k8s"))
        derived.append(RuleLabel(POLICY_LABEL_UID, self.uid, "k8s"))
        return tuple(sorted(derived + list(rule.labels), key=lambda label: label.key))

    def rules_json(self) -> list[dict]:
        """Each rule as ``cilium policy get`` prints it: the spec as written, with ``labels``
        (:meth:`rule_labels`) and ``description``, in the order of Cilium's api.Rule JSON."""
        document = self.document
        specs = ([document["spec"]] if "spec" in document else []) + list(
            document.get("specs") or [])
        out = []
        for spec, rule in zip(specs, self.rules, strict=True):
            item = {key: spec[key] for key in _RULE_JSON_ORDER if key in spec}
            item["labels"] = [label.to_json() for label in self.rule_labels(rule)]
            if rule.description:
                item["description"] = rule.description
            out.append({key: item[key] for key in _RULE_JSON_ORDER if key in item})
        return out

    @property
    def warnings(self) -> tuple[str, ...]:
        """What Cilium's preflight check (``cilium-dbg preflight validate-cnp``,
        pkg/k8s/apis/cilium.io/v2/validator) warns about in an accepted policy."""
        if self.description:
            return (f"{self.display}: {TOP_LEVEL_DESCRIPTION}",)
        return ()

    def check_node_peers(self, enabled: bool) -> None:
        """Refuse node peers unless ``--enable-node-selector-labels``, as Cilium does."""
        if not enabled and any(rule.uses_nodes for rule in self.rules):
            raise PolicyError(f"{self.display}: {NODE_SELECTOR_LABELS_OFF}")

    @property
    def document(self) -> dict:
        return json.loads(self.document_json)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace or "", self.name)

    @property
    def display(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else \
            f"{self.kind} {self.name}"


#: The keys of Cilium's api.Rule JSON (MarshalJSON in pkg/policy/api/rule.go), in its order.
_RULE_JSON_ORDER = ("endpointSelector", "nodeSelector", "ingress", "ingressDeny", "egress",
                    "egressDeny", "labels", "enableDefaultDeny", "description", "log")


# ---------------------------------------------------------------------------------------------


#: Input limits: far above any real policy set, low enough that one import cannot exhaust the
#: agent. A policy of 10,000 rules is about 1 MiB of YAML and 260,000 YAML nodes.
MAX_INPUT_BYTES = 8 * 1024 * 1024
MAX_YAML_NODES = 2_000_000  # counting every alias as the nodes it stands for
MAX_YAML_DEPTH = 64
MAX_DOCUMENTS = 10_000
MAX_RULES = 20_000  # per policy: rule items of every section of every spec
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when there


def check_yaml(text: str, source: str) -> None:
    """Refuse input that would cost more to load than any policy can need: too many bytes,
    too deep, or too many nodes once aliases are expanded (a "billion laughs" bomb is a few
    hundred bytes). Reads the event stream only, which never recurses and never expands."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_INPUT_BYTES:
        raise PolicyError(f"{source}: {size} bytes, more than the limit of {MAX_INPUT_BYTES}")
    anchors: dict[str, int] = {}
    stack: list[list] = []  # open collections: [nodes so far, anchor]
    total = depth = documents = 0
    try:
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > MAX_DOCUMENTS:
                    raise PolicyError(f"{source}: more than {MAX_DOCUMENTS} documents")
                continue
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                stack.append([1, event.anchor])
                depth = max(depth, len(stack))
                if depth > MAX_YAML_DEPTH:
                    raise PolicyError(f"{source}: nested deeper than {MAX_YAML_DEPTH} levels")
                continue
            if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                size_of, anchor = stack.pop()
            elif isinstance(event, yaml.ScalarEvent):
                size_of, anchor = 1, event.anchor
            elif isinstance(event, yaml.AliasEvent):
                size_of, anchor = anchors.get(event.anchor, 1), None
            else:
                continue
            if anchor is not None:
                anchors[anchor] = size_of
            if stack:
                stack[-1][0] += size_of
            else:
                total += size_of
            if total + sum(n for n, _ in stack) > MAX_YAML_NODES:
                raise PolicyError(f"{source}: more than {MAX_YAML_NODES} YAML nodes once its"
                                  " aliases are expanded")
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML/JSON: {exc}") from None


def parse_policies(text: str, source: str = "input") -> list[Policy]:
    """Every document of a YAML/JSON stream; PolicyError names document, field and problem."""
    check_yaml(text, source)
    try:
        documents = [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML/JSON: {exc}") from None
    if not documents:
        raise PolicyError(f"{source}: no policy document found")
    policies = []
    for index, document in enumerate(documents, 1):
        if isinstance(document, dict) and document.get("kind") == "List":
            items = document.get("items")
            if not isinstance(items, list):
                raise PolicyError(f"{source} document {index}: List without items")
            policies += [parse_document(item, f"{source} document {index}.{i}")
                         for i, item in enumerate(items, 1)]
        else:
            policies.append(parse_document(document, f"{source} document {index}"))
    return policies


def parse_document(document: Any, where: str) -> Policy:
    p = _Parser(where)
    doc = p.mapping(document, "")
    kind = doc.get("kind")
    if kind not in (CNP, CCNP):
        p.fail("kind", f"must be {CNP} or {CCNP}, not {kind!r}")
    if doc.get("apiVersion") != API_VERSION:
        p.fail("apiVersion", f"must be {API_VERSION!r}, not {doc.get('apiVersion')!r}")
    p.only(doc, "", {"apiVersion", "kind", "metadata", "spec", "specs", "status", "description"})
    meta = p.mapping(doc.get("metadata"), "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        p.fail("metadata.name", "is required")
    p.where = f"{where} ({kind} {name})"
    description = doc.get("description", "")
    if not isinstance(description, str):
        p.fail("description", "must be a string")
    namespace = meta.get("namespace")
    if kind == CCNP:
        if namespace is not None:
            p.fail("metadata.namespace", "a clusterwide policy has no namespace")
    else:
        namespace = namespace or "default"
        if not isinstance(namespace, str):
            p.fail("metadata.namespace", "must be a string")
    specs = []
    if "spec" in doc:
        specs.append((doc["spec"], "spec"))
    if "specs" in doc:
        items = doc["specs"]
        if not isinstance(items, list) or not items:
            p.fail("specs", "must be a non-empty list")
        specs += [(item, f"specs[{i}]") for i, item in enumerate(items)]
    if not specs:
        p.fail("spec", "is required (or specs)")
    if len(specs) > MAX_RULES:
        p.fail("specs", f"{len(specs)} specs, more than the limit of {MAX_RULES} rules")
    rules = tuple(p.rule(spec, path, clusterwide=kind == CCNP) for spec, path in specs)
    count = sum(len(r.ingress) + len(r.ingress_deny) + len(r.egress) + len(r.egress_deny)
                for r in rules)
    if count > MAX_RULES:
        p.fail("spec", f"{count} rules, more than the limit of {MAX_RULES}")
    uid = meta.get("uid", "")
    if not isinstance(uid, str):
        p.fail("metadata.uid", "must be a string")
    return Policy(kind, name, namespace, rules, json.dumps(doc), uid, description)


class _Parser:
    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, problem: str):
        raise PolicyError(f"{self.where}: {path or 'document'}: {problem}")

    def mapping(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, not {type(value).__name__}")
        return value

    def listing(self, value: Any, path: str) -> list:
        if not isinstance(value, list):
            self.fail(path, f"must be a list, not {type(value).__name__}")
        return value

    def only(self, obj: dict, path: str, allowed: set[str]) -> None:
        for key in obj:
            if key in allowed:
                continue
            where = f"{path}.{key}" if path else key
            if key in _UNSUPPORTED:
                self.fail(where, f"{_UNSUPPORTED[key]} are not supported by meshagent")
            self.fail(where, "unknown field")

    def rule(self, spec: Any, path: str, clusterwide: bool) -> Rule:
        spec = self.mapping(spec, path)
        self.only(spec, path, {"endpointSelector", "ingress", "ingressDeny", "egress",
                               "egressDeny", "description", "labels", "enableDefaultDeny"})
        if "endpointSelector" not in spec:
            self.fail(f"{path}.endpointSelector", "is required")
        selector = self.selector(spec["endpointSelector"], f"{path}.endpointSelector")
        sections = {}
        for name, peers, deny in (("ingress", _INGRESS_PEERS, False),
                                  ("ingressDeny", _INGRESS_PEERS, True),
                                  ("egress", _EGRESS_PEERS, False),
                                  ("egressDeny", _EGRESS_PEERS, True)):
            items = self.listing(spec.get(name, []) or [], f"{path}.{name}")
            sections[name] = tuple(self.peer_rule(item, f"{path}.{name}[{i}]", peers, deny)
                                   for i, item in enumerate(items))
        default_deny = self.mapping(spec.get("enableDefaultDeny", {}) or {},
                                    f"{path}.enableDefaultDeny")
        self.only(default_deny, f"{path}.enableDefaultDeny", {"ingress", "egress"})
        for key, value in default_deny.items():
            if not isinstance(value, bool):
                self.fail(f"{path}.enableDefaultDeny.{key}", "must be true or false")
        description = spec.get("description", "")
        if not isinstance(description, str):
            self.fail(f"{path}.description", "must be a string")
        labels = tuple(self.rule_label(label, f"{path}.labels[{i}]") for i, label in enumerate(
            self.listing(spec.get("labels", []) or [], f"{path}.labels")))
        return Rule(selector, sections["ingress"], sections["ingressDeny"], sections["egress"],
                    sections["egressDeny"], default_deny.get("ingress"),
                    default_deny.get("egress"), description, labels)

    def rule_label(self, value: Any, path: str) -> RuleLabel:
        """A label as Cilium's labels.Label reads it from JSON (pkg/labels/labels.go
        UnmarshalJSON): an object ``{key, value, source}`` or the short form
        ``[source:]key[=value]``; no source is ``unspec`` (ParseToCiliumLabels)."""
        if isinstance(value, str):
            if not value:
                self.fail(path, "invalid Label: Failed to parse \"\" as a string")
            source, sep, rest = value.partition(":")
            if not sep:
                source, rest = "", value
            key, _, label_value = rest.partition("=")
        else:
            value = self.mapping(value, path)
            self.only(value, path, {"key", "value", "source"})
            key, label_value, source = (value.get(k, "") for k in ("key", "value", "source"))
            for name, text in (("key", key), ("value", label_value), ("source", source)):
                if not isinstance(text, str):
                    self.fail(f"{path}.{name}", "must be a string")
        if not key:
            self.fail(f"{path}.key", "invalid Label: it does not contain label key")
        return RuleLabel(key, label_value, source or "unspec")

    def peer_rule(self, item: Any, path: str, peers: set[str], deny: bool) -> PeerRule:
        item = self.mapping(item, path)
        prefix = "from" if "fromEndpoints" in peers else "to"
        egress = prefix == "to"
        if "toFQDNs" in item and (deny or not egress):
            self.fail(f"{path}.toFQDNs", "unknown field (Cilium has toFQDNs in egress rules"
                                         " only, not in ingress, ingressDeny or egressDeny)")
        self.only(item, path, peers | {"toPorts", "icmps"} | ({"toFQDNs"} if egress else set()))
        if "icmps" in item and "toPorts" in item:
            # Cilium's errUnsupportedICMPWithToPorts (pkg/policy/api/rule_validation.go)
            self.fail(f"{path}.icmps", "the ICMPs block may only be present without ToPorts."
                                       " Define a separate rule to use ToPorts")
        present = [m for m in (_EGRESS_MEMBERS if egress else _INGRESS_MEMBERS)
                   if isinstance(item.get(m), list) and item[m]]
        if len(present) > 1 and _EXCLUSIVE_MEMBERS.intersection(present):
            # Cilium's (rule_validation.go, Validate of Ingress/EgressCommonRule)
            self.fail(path, f"combining {_member(present[0])} and {_member(present[1])} is"
                            " not supported yet")
        endpoints = entities = cidrs = fqdns = nodes = None
        if f"{prefix}Nodes" in item:
            field = f"{path}.{prefix}Nodes"
            nodes = tuple(self.selector(s, f"{field}[{i}]")
                          for i, s in enumerate(self.listing(item[f"{prefix}Nodes"], field)))
        if f"{prefix}Endpoints" in item:
            field = f"{path}.{prefix}Endpoints"
            endpoints = tuple(self.selector(s, f"{field}[{i}]")
                              for i, s in enumerate(self.listing(item[f"{prefix}Endpoints"],
                                                                 field)))
        if f"{prefix}Entities" in item:
            field = f"{path}.{prefix}Entities"
            entities = tuple(self.entity(e, f"{field}[{i}]")
                             for i, e in enumerate(self.listing(item[f"{prefix}Entities"], field)))
        collected = []
        if f"{prefix}CIDR" in item:
            field = f"{path}.{prefix}CIDR"
            for i, text in enumerate(self.listing(item[f"{prefix}CIDR"], field)):
                collected.append(CIDRRule(self.cidr(text, f"{field}[{i}]")))
        if f"{prefix}CIDRSet" in item:
            field = f"{path}.{prefix}CIDRSet"
            for i, entry in enumerate(self.listing(item[f"{prefix}CIDRSet"], field)):
                collected.append(self.cidr_set(entry, f"{field}[{i}]"))
        if f"{prefix}CIDR" in item or f"{prefix}CIDRSet" in item:
            cidrs = tuple(collected)
        services = None
        if "toServices" in item:
            services = self.services(item, path)
        if "toFQDNs" in item:
            field = f"{path}.toFQDNs"
            fqdns = tuple(self.fqdn_selector(s, f"{field}[{i}]", dns_rule=False)
                          for i, s in enumerate(self.listing(item["toFQDNs"], field)))
        ports: list[PortProtocol] = []
        dns: list[DNSPortRule] = []
        if "toPorts" in item:
            field = f"{path}.toPorts"
            for i, entry in enumerate(self.listing(item["toPorts"], field)):
                entry_ports, rules = self.port_rule(entry, f"{field}[{i}]", egress=egress,
                                                    deny=deny)
                ports += entry_ports
                if rules is not None:
                    dns.append(DNSPortRule(tuple(entry_ports), rules))
        if "icmps" in item:
            field = f"{path}.icmps"
            ports += [p for i, entry in enumerate(self.listing(item["icmps"], field))
                      for p in self.icmp_rule(entry, f"{field}[{i}]")]
        return PeerRule(endpoints, entities, cidrs, tuple(ports), services, fqdns,
                         tuple(dns), nodes)

    def fqdn_selector(self, value: Any, path: str, dns_rule: bool) -> FQDNSelector:
        """A toFQDNs item (``dns_rule`` False: one of the two fields) or a ``rules: dns`` item
        (either or both), checked as Cilium's FQDNSelector/PortRuleDNS (pkg/policy/api/fqdn.go)
        and the CRD (one of the two required, at most 255 characters)."""
        value = self.mapping(value, path)
        self.only(value, path, {"matchName", "matchPattern"})
        name, pattern = value.get("matchName", ""), value.get("matchPattern", "")
        for key, text in (("matchName", name), ("matchPattern", pattern)):
            if not isinstance(text, str):
                self.fail(f"{path}.{key}", "must be a string")
            if len(text) > MAX_FQDN_LENGTH:
                self.fail(f"{path}.{key}", f"Too long: may not be longer than {MAX_FQDN_LENGTH}")
        if not name and not pattern:
            self.fail(path, "one of matchName or matchPattern is required")
        if name and pattern and not dns_rule:
            self.fail(path, "only one of MatchName or MatchPattern is allowed in an FQDNSelector")
        if name and not _MATCH_NAME_CHARS.match(name):
            self.fail(f"{path}.matchName", f'Invalid characters in MatchName: "{name}". Only'
                                           " 0-9, a-z, A-Z and . and - characters are allowed")
        if pattern and not _MATCH_PATTERN_CHARS.match(pattern):
            self.fail(f"{path}.matchPattern", f'Invalid characters in MatchPattern: "{pattern}".'
                                              " Only 0-9, a-z, A-Z and ., - and * characters"
                                              " are allowed")
        if pattern:
            try:
                matchpattern.validate(pattern)
            except ValueError as exc:
                self.fail(f"{path}.matchPattern", str(exc))
        return FQDNSelector(name, pattern)

    def services(self, item: dict, path: str) -> tuple[ServiceRef, ...]:
        """``toServices`` (alone among the peers: :data:`_EXCLUSIVE_MEMBERS`; the selectors
        and CIDRs generated from it do not count, as in Cilium)."""
        field = f"{path}.toServices"
        return tuple(self.service_ref(entry, f"{field}[{i}]")
                     for i, entry in enumerate(self.listing(item["toServices"], field)))

    def service_ref(self, value: Any, path: str) -> ServiceRef:
        value = self.mapping(value, path)
        self.only(value, path, {"k8sService", "k8sServiceSelector"})
        if "k8sService" in value and "k8sServiceSelector" in value:
            self.fail(path, "give one of k8sService or k8sServiceSelector")
        if not value:  # Cilium's examples/policies/service-empty.yaml: selects no Service
            return ServiceRef()
        if "k8sService" in value:
            where = f"{path}.k8sService"
            ref = self.mapping(value["k8sService"], where)
            self.only(ref, where, {"serviceName", "namespace"})
            name = ref.get("serviceName")
            if not isinstance(name, str) or not name:
                self.fail(f"{where}.serviceName", "is required")
            return ServiceRef(self.service_namespace(ref, where), name=name)
        where = f"{path}.k8sServiceSelector"
        ref = self.mapping(value["k8sServiceSelector"], where)
        self.only(ref, where, {"selector", "namespace"})
        if "selector" not in ref:
            self.fail(f"{where}.selector", "is required")
        return ServiceRef(self.service_namespace(ref, where),
                          selector=self.selector(ref["selector"], f"{where}.selector"))

    def service_namespace(self, ref: dict, where: str) -> str:
        namespace = ref.get("namespace") or ""
        if not isinstance(namespace, str):
            self.fail(f"{where}.namespace", "must be a string")
        return namespace

    def selector(self, value: Any, path: str) -> EndpointSelector:
        if value is None:  # through Kubernetes a null selector is no selector at all
            self.fail(path, "must be a label selector ({} selects every endpoint), not null")
        value = self.mapping(value, path)
        self.only(value, path, {"matchLabels", "matchExpressions"})
        requirements = []
        labels = self.mapping(value.get("matchLabels", {}) or {}, f"{path}.matchLabels")
        for key, label_value in labels.items():
            if not isinstance(key, str) or not key:
                self.fail(f"{path}.matchLabels", f"label key {key!r} must be a string")
            if not isinstance(label_value, (str, int, bool)) or isinstance(label_value, bool):
                self.fail(f"{path}.matchLabels.{key}", "label value must be a string")
            requirements.append(Requirement(key, "In", frozenset({str(label_value)})))
        for i, expr in enumerate(self.listing(value.get("matchExpressions", []) or [],
                                              f"{path}.matchExpressions")):
            where = f"{path}.matchExpressions[{i}]"
            expr = self.mapping(expr, where)
            self.only(expr, where, {"key", "operator", "values"})
            key, operator = expr.get("key"), expr.get("operator")
            if not isinstance(key, str) or not key:
                self.fail(f"{where}.key", "is required")
            if operator not in OPERATORS:
                self.fail(f"{where}.operator", f"must be one of {', '.join(OPERATORS)},"
                                               f" not {operator!r}")
            values = self.listing(expr.get("values", []) or [], f"{where}.values")
            if operator in ("In", "NotIn") and not values:
                self.fail(f"{where}.values", f"{operator} needs at least one value")
            if operator in ("Exists", "DoesNotExist") and values:
                self.fail(f"{where}.values", f"{operator} takes no values")
            requirements.append(Requirement(key, operator, frozenset(str(v) for v in values)))
        return EndpointSelector(tuple(sorted(requirements, key=lambda r: (r.key, r.operator))))

    def entity(self, value: Any, path: str) -> str:
        if value not in ENTITIES:
            self.fail(path, f"unknown entity {value!r}; supported: {', '.join(ENTITIES)}")
        return value

    def cidr(self, value: Any, path: str) -> Network:
        if not isinstance(value, str):
            self.fail(path, "must be a CIDR string")
        try:
            return ipaddress.ip_network(value)
        except ValueError as exc:
            family = "IPv6" if ":" in value else "IPv4"
            self.fail(path, f"{value!r} is not a valid {family} CIDR ({exc})")

    def cidr_set(self, value: Any, path: str) -> CIDRRule:
        value = self.mapping(value, path)
        self.only(value, path, {"cidr", "except"})
        cidr = self.cidr(value.get("cidr"), f"{path}.cidr")
        excepts = []
        for i, text in enumerate(self.listing(value.get("except", []) or [], f"{path}.except")):
            network = self.cidr(text, f"{path}.except[{i}]")
            if network.version != cidr.version:
                self.fail(f"{path}.except[{i}]", f"{network} is not of the family of {cidr}")
            if not network.subnet_of(cidr):
                self.fail(f"{path}.except[{i}]", f"{network} is not inside {cidr}")
            excepts.append(network)
        return CIDRRule(cidr, tuple(excepts))

    def port_rule(self, value: Any, path: str, *, egress: bool, deny: bool
                  ) -> tuple[list[PortProtocol], tuple[FQDNSelector, ...] | None]:
        """A toPorts item: its ports, and its DNS rules (None: it has none). Cilium's checks
        and texts for L7 DNS rules (PortRule.Validate, L7Rules.Validate in
        pkg/policy/api/rule_validation.go); other L7 kinds are refused by name."""
        value = self.mapping(value, path)
        if deny and "rules" in value:
            self.fail(f"{path}.rules", "unknown field (Cilium's deny rules have no L7 rules)")
        self.only(value, path, {"ports", "rules"})
        rules = self.mapping(value.get("rules") or {}, f"{path}.rules")
        self.only(rules, f"{path}.rules", {"dns", *_L7_KINDS})
        for key in rules:
            if key in _L7_KINDS:
                self.fail(f"{path}.rules.{key}", f"{_L7_KINDS[key]} L7 rules are not supported"
                                                 " by meshagent (only dns, on egress)")
        dns = self.listing(rules.get("dns") or [], f"{path}.rules.dns")
        if dns and not egress:
            self.fail(f"{path}.rules.dns", "DNS rules are not allowed on ingress")
        out = []
        for i, entry in enumerate(self.listing(value.get("ports", []) or [], f"{path}.ports")):
            where = f"{path}.ports[{i}]"
            entry = self.mapping(entry, where)
            self.only(entry, where, {"port", "endPort", "protocol"})
            port_text = entry.get("port", "0")
            if isinstance(port_text, bool) or not isinstance(port_text, (str, int)):
                self.fail(f"{where}.port", "must be a port number")
            port_text = str(port_text)
            if not port_text.isdigit():
                self.fail(f"{where}.port", f"named ports ({port_text!r}) are not supported by"
                                           " meshagent; use the number")
            port = int(port_text)
            if not 0 <= port <= 65535:
                self.fail(f"{where}.port", f"{port} is out of range 0..65535")
            end = entry.get("endPort", port)
            if isinstance(end, bool) or not isinstance(end, int) or not port <= end <= 65535:
                self.fail(f"{where}.endPort", f"must be a number from {port} to 65535")
            if end != port and port == 0:
                self.fail(f"{where}.endPort", "a range needs a start port")
            if dns and end > port:
                self.fail(f"{where}.endPort", "DNS rules do not support port ranges")
            protocol = entry.get("protocol", "ANY")
            if protocol not in PORT_PROTOCOLS:
                hint = "; ICMP is matched by an icmps rule" if protocol in ("ICMP", "ICMPv6") \
                    else ""
                self.fail(f"{where}.protocol", f"must be one of {', '.join(PORT_PROTOCOLS)},"
                                               f" not {protocol!r}{hint}")
            if dns and protocol not in _DNS_PROTOCOLS:
                self.fail(f"{where}.protocol", f"DNS rules apply to {', '.join(_DNS_PROTOCOLS)}"
                                               f" (the DNS proxy's), not {protocol}")
            out.append(PortProtocol(port, end, protocol))
        if dns:
            if not out:
                self.fail(f"{path}.ports", "port 53 must be specified for DNS rules")
            if any(p.port == 0 for p in out):
                self.fail(f"{path}.ports", "L7 rules can not be used when a port is 0")
        if not out:
            self.fail(f"{path}.ports", "needs at least one port")
        if not dns:
            return out, None  # rules: {} or dns: [] are no L7 rules (Cilium's IsEmpty)
        return out, tuple(self.fqdn_selector(d, f"{path}.rules.dns[{i}]", dns_rule=True)
                          for i, d in enumerate(dns))

    def icmp_rule(self, value: Any, path: str) -> list[PortProtocol]:
        """An ``icmps`` item: each field a port entry of ICMP/ICMPv6 whose port is the type, as
        Cilium's ICMPField.PortProtocol (pkg/policy/api/icmp.go) makes it, with its errors."""
        value = self.mapping(value, path)
        self.only(value, path, {"fields"})
        fields = self.listing(value.get("fields", []) or [], f"{path}.fields")
        if not fields:
            self.fail(f"{path}.fields", "needs at least one field")
        if len(fields) > icmp.MAX_FIELDS:
            self.fail(f"{path}.fields", f"too many types, the max is {icmp.MAX_FIELDS}")
        out = []
        for i, entry in enumerate(fields):
            where = f"{path}.fields[{i}]"
            entry = self.mapping(entry, where)
            self.only(entry, where, {"family", "type"})
            family = entry.get("family", icmp.IPV4)
            if family == "":
                family = icmp.IPV4  # Cilium reads an empty family as IPv4
            if family not in icmp.FAMILIES:
                self.fail(f"{where}.family", f"wrong family: {family}")
            if "type" not in entry:
                self.fail(f"{where}.type", "is required")
            kind = entry["type"]
            if isinstance(kind, str):
                if kind not in icmp.TYPES[family]:
                    self.fail(f"{where}.type", f"ICMP type {kind} not found in {family}")
                number = icmp.TYPES[family][kind]
            elif isinstance(kind, int) and not isinstance(kind, bool):
                if not 0 <= kind <= 255:
                    self.fail(f"{where}.type", f"{kind} is out of range 0..255")
                number = kind
            else:
                self.fail(f"{where}.type", "must be a type number (0..255) or a type name")
            if number == 0:
                # Cilium keys the rule with the type as its port, and port 0 is every port:
                # its rule for type 0 matches every ICMP type (cilium/cilium#41304)
                named = f"type {kind} (0)" if isinstance(kind, str) else "type 0"
                self.fail(f"{where}.type", f"{named} is refused: Cilium enforces a rule"
                                           f" for type 0 as one for every {family} ICMP type"
                                           " (cilium/cilium#41304); echo replies to an allowed"
                                           " echo request pass as replies")
            out.append(PortProtocol(number, number, icmp.PROTOCOL[family]))
        return out


def _member(field: str) -> str:
    """A field as Cilium's Go struct names it in errors: toFQDNs -> ToFQDNs."""
    return field[0].upper() + field[1:]


#: What a DNS rule's ports may be: the DNS proxy listens on UDP and TCP
_DNS_PROTOCOLS = ("TCP", "UDP", "ANY")
