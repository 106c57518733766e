"""The policy-semantics table: one policy set, one endpoint, one peer, one port -> verdict.

Each case states what current Cilium does; the comment says why where it is not obvious. The
resolver contract suite (:mod:`meshagent.testing.resolver_contract`) drives every case through a
policy resolver's contract, and meshagent's own tests drive them through the resolver directly
and through the kernel. A case whose text starts with ``FLAT:`` runs with
``--policy-default-local-cluster=false``.
"""

from meshagent.model.identity import Identity

C1, C2 = 101 << 16, 102 << 16
TCP, UDP, SCTP, ICMP = 6, 17, 132, 1


def L(app: str, ns: str = "default", cluster: str = "cluster1", **extra: str) -> frozenset:
    labels = {f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={ns}",
              f"k8s:io.cilium.k8s.policy.cluster={cluster}"}
    labels |= {f"k8s:{k.replace('_', '-')}={v}" for k, v in extra.items()}
    return frozenset(labels)


def node_labels(cluster: str, **labels: str) -> frozenset:
    return frozenset({"reserved:remote-node", f"k8s:io.cilium.k8s.policy.cluster={cluster}"}
                     | {f"node:{k}={v}" for k, v in labels.items()})


NODES = 2 << 24  # Cilium's remote-node identity scope
NS_TEAM_A = frozenset({"k8s:io.cilium.k8s.namespace.labels.team=a"})

IDS = {
    "db": Identity(C1 + 300, L("protected-db"), "cluster1"),
    "employee": Identity(C1 + 301, L("employee"), "cluster1"),
    "stranger": Identity(C1 + 302, L("stranger"), "cluster1"),
    "employee-c2": Identity(C2 + 300, L("employee", "istio-space", "cluster2"), "cluster2"),
    "employee-c2-default": Identity(C2 + 301, L("employee", "default", "cluster2"), "cluster2"),
    "employee-other-ns": Identity(C1 + 303, L("employee", "other"), "cluster1"),
    "frontend": Identity(C1 + 304, L("frontend", tier="web"), "cluster1"),
    "backend": Identity(C1 + 305, L("backend", tier="api"), "cluster1"),
    # pods of namespace "other", whose Namespace object carries the label team=a: Cilium
    # gives every pod its namespace's labels as k8s:io.cilium.k8s.namespace.labels.<key>
    "employee-team-a": Identity(C1 + 306, L("employee", "other") | NS_TEAM_A, "cluster1"),
    "employee-c2-team-a": Identity(C2 + 302, L("employee", "other", "cluster2") | NS_TEAM_A,
                                   "cluster2"),
    # a pod carrying the label a node selector names: fromNodes must not select it
    "pod-role-worker": Identity(C1 + 320, L("worker-pod", role="worker"), "cluster1"),
    # other nodes under --enable-node-selector-labels: the identity of their labels
    # (meshagent.identity.node: reserved:remote-node, the cluster, node:<key>=<value>)
    "node-worker": Identity(NODES + 1, node_labels("cluster1", role="worker"), "cluster1"),
    "node-infra": Identity(NODES + 2, node_labels("cluster1", role="infra"), "cluster1"),
    "node-worker-c2": Identity(NODES + 3, node_labels("cluster2", role="worker"), "cluster1"),
    "world": Identity(2, frozenset({"reserved:world"})),
    "host": Identity(1, frozenset({"reserved:host"})),
    "remote-node": Identity(6, frozenset({"reserved:remote-node"})),
    "cidr-10-1": Identity((1 << 24) + 1, frozenset({"cidr:10.1.0.0/16", "reserved:world"})),
    "cidr-10-1-5": Identity((1 << 24) + 2, frozenset({"cidr:10.1.5.0/24", "reserved:world"})),
    "kube-dns": Identity(C1 + 307, L("kube-dns", "kube-system", k8s_app="kube-dns"), "cluster1"),
    # what the DNS proxy gives an answered address: one fqdn: label per toFQDNs selector
    # matching the name, and the world (Cilium 1.16+, pkg/fqdn/namemanager)
    "fqdn-api": Identity((1 << 24) + 3, frozenset({"fqdn:api.example.com", "reserved:world"})),
    "fqdn-www": Identity((1 << 24) + 4, frozenset({"fqdn:*.example.com", "reserved:world"})),
}

SEED = """
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "clustermesh-ingress-l4-policy"
  description: "demo: allow only employee to access protected-db"
spec:
  endpointSelector:
    matchLabels:
      app: protected-db
      io.cilium.k8s.policy.cluster: cluster1
  ingress:
  - toPorts:
    - ports:
      - port: "6379"
        protocol: TCP
    fromEndpoints:
      - matchLabels:
          app: employee
          io.cilium.k8s.policy.cluster: cluster2
          k8s:io.kubernetes.pod.namespace: istio-space
      - matchLabels:
          app: employee
          # io.cilium.k8s.policy.cluster: cluster1
          k8s:io.kubernetes.pod.namespace: default
"""


def cnp(spec: str, name: str = "p", namespace: str = "default") -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n"
            f"  namespace: {namespace}\nspec:\n{body}\n")


def ccnp(spec: str, name: str = "cw") -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return (f"apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n"
            f"  name: {name}\nspec:\n{body}\n")


DB_SEL = "endpointSelector:\n  matchLabels:\n    app: protected-db\n"
#: ingress from every endpoint (as a clusterwide policy reads it), and from pods whose
#: namespace has the label team=a
FROM_ALL_ENDPOINTS = DB_SEL + "ingress:\n- fromEndpoints: [{}]\n"
FROM_TEAM_A = DB_SEL + ("ingress:\n- fromEndpoints: [{matchLabels: "
                        "{io.cilium.k8s.namespace.labels.team: a}}]\n")

FROM_WORKER_NODES = DB_SEL + "ingress:\n- fromNodes: [{matchLabels: {role: worker}}]\n"


CASES = [
    # -- no policy, and the seed -----------------------------------------------------------------
    ("no policy: everything is allowed", "", "stranger", 6379, TCP, "allow"),
    ("seed: cluster2 employee (istio-space) allowed", SEED, "employee-c2", 6379, TCP, "allow"),
    ("seed: cluster1 employee (default) allowed", SEED, "employee", 6379, TCP, "allow"),
    ("seed: stranger denied", SEED, "stranger", 6379, TCP, "deny"),
    ("seed: employee on another port denied", SEED, "employee", 6380, TCP, "deny"),
    ("seed: employee over UDP denied", SEED, "employee", 6379, UDP, "deny"),
    ("seed: employee of cluster2 in default is not cluster1's (local-cluster default)", SEED,
     "employee-c2-default", 6379, TCP, "deny"),
    ("seed: employee in another namespace denied", SEED, "employee-other-ns", 6379, TCP, "deny"),
    # -- default deny --------------------------------------------------------------------------
    ("ingress section => default deny", cnp(DB_SEL + "ingress:\n- {}\n"), "employee", 6379, TCP,
     "deny"),
    ("policy not selecting the endpoint changes nothing",
     cnp("endpointSelector:\n  matchLabels:\n    app: other\ningress:\n- {}\n"), "stranger",
     6379, TCP, "allow"),
    ("egress-only policy leaves ingress open",
     cnp(DB_SEL + "egress:\n- toEntities: [world]\n"), "stranger", 6379, TCP, "allow"),
    ("enableDefaultDeny ingress false: rules add, nothing is closed",
     cnp(DB_SEL + "enableDefaultDeny: {ingress: false}\n"
         "ingressDeny:\n- fromEndpoints: [{matchLabels: {app: stranger}}]\n"),
     "employee", 6379, TCP, "allow"),
    ("a deny-only policy puts the endpoint in default deny",
     cnp(DB_SEL + "ingressDeny:\n- fromEndpoints: [{matchLabels: {app: stranger}}]\n"),
     "employee", 6379, TCP, "deny"),
    # -- L4 --------------------------------------------------------------------------------------
    ("ports without peers: any peer on that port",
     cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '6379', protocol: TCP}]}]\n"),
     "stranger", 6379, TCP, "allow"),
    ("ports without peers: other port denied",
     cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '6379', protocol: TCP}]}]\n"),
     "stranger", 22, TCP, "deny"),
    ("port range start", cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '8000', endPort: "
                                      "8100, protocol: TCP}]}]\n"), "stranger", 8000, TCP, "allow"),
    ("port range end", cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '8000', endPort: "
                                    "8100, protocol: TCP}]}]\n"), "stranger", 8100, TCP, "allow"),
    ("port range outside", cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '8000', endPort: "
                                        "8100, protocol: TCP}]}]\n"), "stranger", 8101, TCP,
     "deny"),
    ("protocol ANY covers UDP",
     cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '53', protocol: ANY}]}]\n"), "stranger",
     53, UDP, "allow"),
    ("no protocol means ANY (SCTP)", cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '9'}]}]\n"),
     "stranger", 9, SCTP, "allow"),
    ("UDP rule does not open TCP",
     cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '53', protocol: UDP}]}]\n"), "stranger",
     53, TCP, "deny"),
    # -- L3 endpoints ------------------------------------------------------------------------------
    ("fromEndpoints without ports: all ports",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n"), "employee",
     12345, UDP, "allow"),
    ("matchLabels with k8s: prefix",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {'k8s:app': employee}}]\n"),
     "employee", 6379, TCP, "allow"),
    ("empty selector: every endpoint of the namespace",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{}]\n"), "stranger", 6379, TCP, "allow"),
    ("empty selector does not reach other namespaces",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{}]\n"), "employee-other-ns", 6379, TCP, "deny"),
    ("empty selector is not the world", cnp(DB_SEL + "ingress:\n- fromEndpoints: [{}]\n"),
     "world", 6379, TCP, "deny"),
    ("peer naming its namespace leaves the policy's",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee, "
                  "'k8s:io.kubernetes.pod.namespace': other}}]\n"), "employee-other-ns", 1, TCP,
     "allow"),
    ("matchExpressions In", cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchExpressions: [{key: "
                                         "app, operator: In, values: [employee, frontend]}]}]\n"),
     "frontend", 1, TCP, "allow"),
    ("matchExpressions NotIn", cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchExpressions: "
                                            "[{key: app, operator: NotIn, values: [stranger]}]}]\n"),
     "stranger", 1, TCP, "deny"),
    ("matchExpressions NotIn others pass",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchExpressions: [{key: app, operator: NotIn, "
                  "values: [stranger]}]}]\n"), "employee", 1, TCP, "allow"),
    ("matchExpressions Exists", cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchExpressions: "
                                             "[{key: tier, operator: Exists}]}]\n"),
     "backend", 1, TCP, "allow"),
    ("matchExpressions DoesNotExist", cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchExpressions:"
                                                   " [{key: tier, operator: DoesNotExist}]}]\n"),
     "backend", 1, TCP, "deny"),
    # -- clusters ------------------------------------------------------------------------------
    ("peer without cluster label: local cluster only (default)",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n"),
     "employee-c2-default", 1, TCP, "deny"),
    ("--policy-default-local-cluster=false: every cluster",
     "FLAT:" + cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n"),
     "employee-c2-default", 1, TCP, "allow"),
    ("the cluster label works for local peers too (unlike the seed's old Cilium)",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee, "
                  "io.cilium.k8s.policy.cluster: cluster1}}]\n"), "employee", 1, TCP, "allow"),
    ("cluster label selects the remote cluster only",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee, "
                  "io.cilium.k8s.policy.cluster: cluster2}}]\n"), "employee", 1, TCP, "deny"),
    # -- entities ------------------------------------------------------------------------------
    ("entity world", cnp(DB_SEL + "ingress:\n- fromEntities: [world]\n"), "world", 1, TCP,
     "allow"),
    ("entity world includes CIDR identities", cnp(DB_SEL + "ingress:\n- fromEntities: [world]\n"),
     "cidr-10-1", 1, TCP, "allow"),
    ("entity world is not cluster endpoints", cnp(DB_SEL + "ingress:\n- fromEntities: [world]\n"),
     "employee", 1, TCP, "deny"),
    ("entity cluster: local endpoints", cnp(DB_SEL + "ingress:\n- fromEntities: [cluster]\n"),
     "employee-other-ns", 1, TCP, "allow"),
    ("entity cluster: host too", cnp(DB_SEL + "ingress:\n- fromEntities: [cluster]\n"), "host", 1,
     TCP, "allow"),
    ("entity cluster: not remote clusters' endpoints",
     cnp(DB_SEL + "ingress:\n- fromEntities: [cluster]\n"), "employee-c2", 1, TCP, "deny"),
    ("entity host", cnp(DB_SEL + "ingress:\n- fromEntities: [host]\n"), "host", 1, TCP, "allow"),
    ("entity remote-node", cnp(DB_SEL + "ingress:\n- fromEntities: [remote-node]\n"),
     "remote-node", 1, TCP, "allow"),
    ("entity all: remote clusters too", cnp(DB_SEL + "ingress:\n- fromEntities: [all]\n"),
     "employee-c2", 1, TCP, "allow"),
    ("entity remote-node: a node identity of its labels",
     cnp(DB_SEL + "ingress:\n- fromEntities: [remote-node]\n"), "node-infra", 1, TCP, "allow"),
    ("entity cluster: other clusters' nodes too",
     cnp(DB_SEL + "ingress:\n- fromEntities: [cluster]\n"), "node-worker-c2", 1, TCP, "allow"),
    ("entity world is not a node", cnp(DB_SEL + "ingress:\n- fromEntities: [world]\n"),
     "node-worker", 1, TCP, "deny"),
    # -- node peers (fromNodes/toNodes: the selector, reserved:remote-node, the local cluster) --
    ("fromNodes selects a node by its labels", cnp(FROM_WORKER_NODES), "node-worker", 1, TCP,
     "allow"),
    ("fromNodes: a node with other labels denied", cnp(FROM_WORKER_NODES), "node-infra", 1, TCP,
     "deny"),
    ("fromNodes: not a pod with the same label", cnp(FROM_WORKER_NODES), "pod-role-worker", 1,
     TCP, "deny"),
    ("fromNodes: never the local host", cnp(DB_SEL + "ingress:\n- fromNodes: [{}]\n"), "host", 1,
     TCP, "deny"),
    ("fromNodes empty selector: every node of the cluster",
     cnp(DB_SEL + "ingress:\n- fromNodes: [{}]\n"), "node-infra", 1, TCP, "allow"),
    ("fromNodes: local cluster only (default)", cnp(FROM_WORKER_NODES), "node-worker-c2", 1,
     TCP, "deny"),
    ("FLAT: fromNodes: every cluster", "FLAT:" + cnp(FROM_WORKER_NODES), "node-worker-c2", 1,
     TCP, "allow"),
    ("fromNodes naming a cluster selects its nodes",
     cnp(DB_SEL + "ingress:\n- fromNodes: [{matchLabels: {role: worker, "
                  "io.cilium.k8s.policy.cluster: cluster2}}]\n"), "node-worker-c2", 1, TCP,
     "allow"),
    ("fromNodes with toPorts: other ports denied",
     cnp(DB_SEL + "ingress:\n- fromNodes: [{matchLabels: {role: worker}}]\n"
                  "  toPorts: [{ports: [{port: '6379', protocol: TCP}]}]\n"),
     "node-worker", 6380, TCP, "deny"),
    ("fromNodes with matchExpressions NotIn",
     cnp(DB_SEL + "ingress:\n- fromNodes: [{matchExpressions: [{key: role, operator: NotIn, "
                  "values: [worker]}]}]\n"), "node-infra", 1, TCP, "allow"),
    ("ingressDeny fromNodes beats an allow",
     cnp(DB_SEL + "ingress:\n- fromEntities: [all]\ningressDeny:\n- fromNodes: "
                  "[{matchLabels: {role: worker}}]\n"), "node-worker", 1, TCP, "deny"),
    # -- CIDR ------------------------------------------------------------------------------------
    ("fromCIDR matches its CIDR identity", cnp(DB_SEL + "ingress:\n- fromCIDR: [10.1.0.0/16]\n"),
     "cidr-10-1", 1, TCP, "allow"),
    ("fromCIDR matches a more specific CIDR identity",
     cnp(DB_SEL + "ingress:\n- fromCIDR: [10.0.0.0/8]\n"), "cidr-10-1-5", 1, TCP, "allow"),
    ("fromCIDRSet except", cnp(DB_SEL + "ingress:\n- fromCIDRSet: [{cidr: 10.1.0.0/16, except: "
                                        "[10.1.5.0/24]}]\n"), "cidr-10-1-5", 1, TCP, "deny"),
    ("fromCIDRSet except leaves the rest", cnp(DB_SEL + "ingress:\n- fromCIDRSet: [{cidr: "
                                                        "10.1.0.0/16, except: [10.1.5.0/24]}]\n"),
     "cidr-10-1", 1, TCP, "allow"),
    ("0.0.0.0/0 is the world", cnp(DB_SEL + "ingress:\n- fromCIDR: [0.0.0.0/0]\n"), "world", 1,
     TCP, "allow"),
    ("CIDR does not select cluster endpoints", cnp(DB_SEL + "ingress:\n- fromCIDR: [0.0.0.0/0]\n"),
     "employee", 1, TCP, "deny"),
    # -- deny ------------------------------------------------------------------------------------
    ("deny beats allow (same policy)",
     cnp(DB_SEL + "ingress:\n- fromEntities: [all]\ningressDeny:\n- fromEndpoints: "
                  "[{matchLabels: {app: stranger}}]\n"), "stranger", 6379, TCP, "deny"),
    ("deny on one port leaves others",
     cnp(DB_SEL + "ingress:\n- fromEntities: [all]\ningressDeny:\n- toPorts: [{ports: [{port: "
                  "'80', protocol: TCP}]}]\n"), "stranger", 81, TCP, "allow"),
    ("deny beats allow across policies",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n", "allow")
     + "---\n" + cnp(DB_SEL + "ingressDeny:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n"
                              "  toPorts: [{ports: [{port: '6379', protocol: TCP}]}]\n", "deny"),
     "employee", 6379, TCP, "deny"),
    ("clusterwide deny beats a namespaced allow",
     cnp(DB_SEL + "ingress:\n- fromEntities: [all]\n") + "---\n"
     + ccnp(DB_SEL + "ingressDeny:\n- fromEntities: [world]\n"), "world", 1, TCP, "deny"),
    # -- ICMP (the port is the type: pkg/policy/api/icmp.go, bpf/lib/policy.h) ---------------
    ("icmps: an echo rule allows echo requests",
     cnp(DB_SEL + "ingress:\n- icmps: [{fields: [{type: 8, family: IPv4}]}]\n"),
     "stranger", 8, ICMP, "allow"),
    ("icmps: an echo rule allows no other ICMP type",
     cnp(DB_SEL + "ingress:\n- icmps: [{fields: [{type: 8}]}]\n"), "stranger", 13, ICMP,
     "deny"),
    ("icmps: an echo rule allows no TCP to port 8",
     cnp(DB_SEL + "ingress:\n- icmps: [{fields: [{type: 8}]}]\n"), "stranger", 8, TCP,
     "deny"),
    ("icmps: a type by its name",
     cnp(DB_SEL + "ingress:\n- icmps: [{fields: [{type: TimeExceeded}]}]\n"), "stranger",
     11, ICMP, "allow"),
    ("icmps: an ICMPv6 type is not an ICMPv4 one",
     cnp(DB_SEL + "ingress:\n- icmps: [{fields: [{type: 128, family: IPv6}]}]\n"),
     "stranger", 128, ICMP, "deny"),
    ("icmps: with an L3 peer, the peer",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n"
         "  icmps: [{fields: [{type: EchoRequest}]}]\n"), "employee", 8, ICMP, "allow"),
    ("icmps: with an L3 peer, not another peer",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n"
         "  icmps: [{fields: [{type: EchoRequest}]}]\n"), "stranger", 8, ICMP, "deny"),
    ("icmps: a deny of one type beats an allow of everything",
     cnp(DB_SEL + "ingress:\n- fromEntities: [all]\n"
         "ingressDeny:\n- icmps: [{fields: [{type: 8}]}]\n"), "stranger", 8, ICMP, "deny"),
    ("icmps: a deny of one type leaves the others",
     cnp(DB_SEL + "ingress:\n- fromEntities: [all]\n"
         "ingressDeny:\n- icmps: [{fields: [{type: 8}]}]\n"), "stranger", 11, ICMP, "allow"),
    ("icmps: a port rule of any protocol does not cover ICMP types",
     cnp(DB_SEL + "ingress:\n- toPorts: [{ports: [{port: '8'}]}]\n"), "stranger", 8, ICMP,
     "deny"),
    ("icmps: an L3-only rule covers every ICMP type",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n"),
     "employee", 13, ICMP, "allow"),
    # -- clusterwide and namespaces ------------------------------------------------------------
    ("clusterwide empty endpointSelector selects every endpoint",
     ccnp("endpointSelector: {}\ningress:\n- {}\n"), "stranger", 1, TCP, "deny"),
    ("namespaced policy does not select other namespaces",
     cnp(DB_SEL + "ingress:\n- {}\n", namespace="other"), "stranger", 1, TCP, "allow"),
    ("clusterwide peer selector spans namespaces",
     ccnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {app: employee}}]\n"),
     "employee-other-ns", 1, TCP, "allow"),
    # Cilium's getEndpointSelector (pkg/k8s/apis/cilium.io/utils/utils.go) makes a clusterwide
    # policy's peer selector that names no namespace require the namespace label (Exists): it
    # selects cluster endpoints only, never world, even when empty or only NotIn.
    ("FLAT: clusterwide empty peer selector is not the world",
     "FLAT:" + ccnp(FROM_ALL_ENDPOINTS), "world", 1, TCP, "deny"),
    ("FLAT: clusterwide NotIn peer selector is not the world",
     "FLAT:" + ccnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchExpressions: [{key: app, "
                             "operator: NotIn, values: [stranger]}]}]\n"), "world", 1, TCP,
     "deny"),
    ("FLAT: clusterwide empty peer selector spans clusters",
     "FLAT:" + ccnp(FROM_ALL_ENDPOINTS), "employee-c2", 1, TCP, "allow"),
    ("clusterwide empty peer selector: local cluster only (default)",
     ccnp(FROM_ALL_ENDPOINTS), "employee-c2", 1, TCP, "deny"),
    # ... and leaves a selector on a reserved label as written: no namespace, no cluster
    ("peer selector on a reserved label gets no namespace and no cluster",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {'reserved:host': ''}}]\n"),
     "host", 1, TCP, "allow"),
    ("clusterwide peer selector on a reserved label: no namespace Exists, no cluster",
     ccnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchLabels: {'reserved:world': ''}}]\n"),
     "world", 1, TCP, "allow"),
    # ... and does not hold a namespaced policy's peer selector to the policy's namespace when
    # it selects on namespace labels (io.cilium.k8s.namespace.labels.*); the local cluster
    # still applies under --policy-default-local-cluster
    ("peer on namespace labels leaves the policy's namespace", cnp(FROM_TEAM_A),
     "employee-team-a", 1, TCP, "allow"),
    ("peer on namespace labels (k8s:, matchExpressions) leaves the policy's namespace",
     cnp(DB_SEL + "ingress:\n- fromEndpoints: [{matchExpressions: [{key: "
                  "'k8s:io.cilium.k8s.namespace.labels.team', operator: Exists}]}]\n"),
     "employee-team-a", 1, TCP, "allow"),
    ("peer on namespace labels: local cluster only (default)", cnp(FROM_TEAM_A),
     "employee-c2-team-a", 1, TCP, "deny"),
    ("FLAT: peer on namespace labels: every cluster", "FLAT:" + cnp(FROM_TEAM_A),
     "employee-c2-team-a", 1, TCP, "allow"),
    ("several specs in one policy",
     "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: multi}\nspecs:\n"
     "- endpointSelector: {matchLabels: {app: protected-db}}\n  ingress:\n"
     "  - fromEndpoints: [{matchLabels: {app: employee}}]\n"
     "- endpointSelector: {matchLabels: {app: protected-db}}\n  ingress:\n"
     "  - fromEndpoints: [{matchLabels: {app: frontend}}]\n", "frontend", 1, TCP, "allow"),
]


EGRESS_CASES = [
    ("egress to endpoints", "egress:\n- toEndpoints: [{matchLabels: {app: protected-db}}]\n",
     "db", 6379, "allow"),
    ("egress default deny", "egress:\n- toEndpoints: [{matchLabels: {app: protected-db}}]\n",
     "backend", 6379, "deny"),
    ("egress to a CIDR", "egress:\n- toCIDRSet: [{cidr: 10.0.0.0/8}]\n", "cidr-10-1", 443,
     "allow"),
    ("egress to world by entity", "egress:\n- toEntities: [world]\n  toPorts: [{ports: [{port: "
                                  "'443', protocol: TCP}]}]\n", "world", 443, "allow"),
    ("egress deny", "egress:\n- toEntities: [all]\negressDeny:\n- toEntities: [world]\n",
     "world", 443, "deny"),
    ("ingress-only policy leaves egress open", "ingress:\n- {}\n", "world", 443, "allow"),
    ("egress to nodes by label", "egress:\n- toNodes: [{matchLabels: {role: infra}}]\n",
     "node-infra", 10250, "allow"),
    ("egress to nodes: other nodes denied",
     "egress:\n- toNodes: [{matchLabels: {role: infra}}]\n", "node-worker", 10250, "deny"),
    ("egressDeny toNodes", "egress:\n- toEntities: [all]\negressDeny:\n- toNodes: [{}]\n",
     "node-worker", 10250, "deny"),
]


#: The standard pair of Cilium's DNS-aware egress (docs: "DNS-based" policies): questions to
#: kube-dns go through the DNS proxy, and the names it answers are the only world allowed.
TO_KUBE_DNS = ("- toEndpoints: [{matchLabels: {'k8s:io.kubernetes.pod.namespace': kube-system,"
               " 'k8s:k8s-app': kube-dns}}]\n"
               "  toPorts: [{ports: [{port: '53', protocol: ANY}],"
               " rules: {dns: [{matchPattern: '*'}]}}]\n")
DNS_PAIR = "egress:\n" + TO_KUBE_DNS + "- toFQDNs: [{matchName: api.example.com}]\n"
DNS_ANY_SERVER = ("- toPorts: [{ports: [{port: '53', protocol: UDP}],"
                  " rules: {dns: [{matchName: api.example.com}]}}]\n")

#: (name, egress spec of the employee, peer, port, protocol, verdict)
FQDN_CASES = [
    ("dns rule: a question to kube-dns goes to the proxy", DNS_PAIR, "kube-dns", 53, UDP,
     "redirect"),
    ("dns rule: protocol ANY takes TCP questions too", DNS_PAIR, "kube-dns", 53, TCP,
     "redirect"),
    ("dns rule: another port to kube-dns is denied", DNS_PAIR, "kube-dns", 80, TCP, "deny"),
    ("dns rule: another server is not the rule's", DNS_PAIR, "world", 53, UDP, "deny"),
    ("toFQDNs: an address of the name is allowed", DNS_PAIR, "fqdn-api", 443, TCP, "allow"),
    ("toFQDNs: the world without the name's label is denied", DNS_PAIR, "world", 443, TCP,
     "deny"),
    ("toFQDNs: another selector's address is denied", DNS_PAIR, "fqdn-www", 443, TCP, "deny"),
    ("toFQDNs alone puts egress in default deny",
     "egress:\n- toFQDNs: [{matchPattern: '*.example.com'}]\n", "kube-dns", 53, UDP, "deny"),
    ("toFQDNs matchPattern selects its own label",
     "egress:\n- toFQDNs: [{matchPattern: '*.example.com'}]\n", "fqdn-www", 80, TCP, "allow"),
    ("toFQDNs with toPorts: the port only",
     "egress:\n- toFQDNs: [{matchName: api.example.com}]\n"
     "  toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n", "fqdn-api", 80, TCP, "deny"),
    ("dns rule without peers: any server (Cilium's implicit L3 allow-all)",
     "egress:\n" + DNS_ANY_SERVER, "world", 53, UDP, "redirect"),
    ("dns rule without peers: its protocol only",
     "egress:\n" + DNS_ANY_SERVER, "world", 53, TCP, "deny"),
    ("redirect beats allow", "egress:\n- toEntities: [all]\n" + DNS_ANY_SERVER, "kube-dns",
     53, UDP, "redirect"),
    ("deny beats redirect",
     "egress:\n" + DNS_ANY_SERVER + "egressDeny:\n- toEntities: [world]\n", "world", 53, UDP,
     "deny"),
    ("rules: dns: [] is no L7 rule (Cilium's IsEmpty): plain allow",
     "egress:\n- toPorts: [{ports: [{port: '53', protocol: UDP}], rules: {dns: []}}]\n",
     "world", 53, UDP, "allow"),
]
