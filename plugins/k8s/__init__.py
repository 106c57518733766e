"""The ``k8s`` plugin: the Kubernetes API server as a source of pod labels, policies and
services.

It watches Namespaces, the Pods of this node, CiliumNetworkPolicies,
CiliumClusterwideNetworkPolicies, Services and EndpointSlices (list, then watch from the
list's resourceVersion; re-list on 410 Gone) and feeds the agent through
``meshagent_endpoint_labels``, ``meshagent_policy_source`` and ``meshagent_service_source``.
It fills no slot: the kvstore (etcd, consul) still carries identities, nodes and the
ClusterMesh state, as in Cilium. See ``source.py``.
"""

from pathlib import Path

import meshagent
from meshagent.plugin import UsageError


@meshagent.hookimpl
def meshagent_addoption(parser):
    group = parser.getgroup("k8s", "Kubernetes source plugin")
    group.addoption("k8s-kubeconfig", type=str, default="",
                    help="kubeconfig file (default: the pod's service account when running in"
                         " Kubernetes, else $KUBECONFIG or ~/.kube/config)")
    group.addoption("k8s-node-name", type=str, default="",
                    help="this node's name in Kubernetes, whose pods are watched (default:"
                         " --node-name)")
    group.addoption("k8s-watch-timeout", type=float, default=300.0,
                    help="seconds a watch request asks the API server to stay open (spread"
                         " up to twice that); a new watch resumes where it ended")
    group.addoption("k8s-pod-wait", type=float, default=10.0,
                    help="seconds an endpoint create waits for its pod to reach the watch"
                         " before reading it from the API server")


@meshagent.hookimpl
def meshagent_configure(config, pluginmanager):
    from meshagent.plugins.k8s.source import KubernetesSource
    kubeconfig = config.get("k8s-kubeconfig")
    if kubeconfig and not Path(kubeconfig).is_file():
        raise UsageError(f"--k8s-kubeconfig {kubeconfig}: no such file")
    if config.get("k8s-watch-timeout") < 1 or config.get("k8s-pod-wait") < 0:
        raise UsageError("--k8s-watch-timeout must be >= 1 and --k8s-pod-wait >= 0")
    pluginmanager.register(KubernetesSource(config), name="k8s.source")
