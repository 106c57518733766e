"""Every hook a meshagent plugin can implement, in one place.

Implement a hook with ``@meshagent.hookimpl`` on a function of the same name in your plugin
module (or object); an implementation may accept any subset of the arguments. The agent calls
hooks through :class:`meshagent.hooks.manager.Hooks`, which calls pluggy's hook caller, so
``tryfirst``/``trylast`` and wrappers work; a wrapper sees one
:class:`meshagent.hooks.answers.Answer` per implementation. A ``@hookimpl`` whose name is not
one of these stops start-up (``check_pending``) unless it is ``optionalhook=True``.

All hooks are synchronous: pluggy never awaits. Work that needs the event loop goes into a
:class:`~meshagent.runtime.controller.Controller` returned from :func:`meshagent_controllers`.

``docs/plugin-hooks.md`` documents each hook with its exact signature; a test checks that it
stays in step with this module.
"""

import pluggy

from meshagent import PROJECT

_hookspec = pluggy.HookspecMarker(PROJECT)

# --------------------------------------------------------------------------------------------
# Registration: options and provider slots
# --------------------------------------------------------------------------------------------


@_hookspec(historic=True)
def meshagent_addoption(parser):
    """Add command-line options, each also settable by environment and ``--config-dir``.

    Fires once per plugin manager, before the full command line is parsed; historic, so a
    plugin registered later still gets the call.

    :param parser: :class:`meshagent.runtime.options.Parser`. Use ``parser.getgroup("<plugin>")`` and
        ``group.addoption("<plugin>-name", type=..., default=..., help=...)``: plugin options
        must carry the plugin's name as prefix (``--etcd-config``).
    :returns: nothing.
    :raises: :class:`meshagent.errors.PluginError` (a bad option name or duplicate) stops
        start-up with exit code 2.
    """


@_hookspec
def meshagent_register_kvstore(registry):
    """Offer kvstore backends (the required ``kvstore`` slot).

    Fires once at agent start, after :func:`meshagent_configure`, when ``meshagent
    plugins`` inspects what each plugin offers, and at ``meshagent kvstoremesh`` start.

    :param registry: :class:`meshagent.hooks.slots.Registry`; call
        ``registry.register("etcd", factory)`` where ``factory(agent)`` (an
        :class:`meshagent.hooks.view.AgentView`) returns a
        :class:`meshagent.kvstore.KVStoreBackend`. ``meshagent kvstoremesh`` is no agent: it
        calls ``factory(None)``, so a backend must not need the agent to be built.
    :returns: nothing.
    :raises: the registry raises :class:`~meshagent.errors.PluginError` on a name another
        plugin registered already; start-up stops with both plugins named.
    """


@_hookspec
def meshagent_register_identity_allocator(registry):
    """Offer identity allocators (the ``identity-allocator`` slot).

    Same timing and contract as :func:`meshagent_register_kvstore`; ``factory(agent)`` returns
    an :class:`meshagent.identity.IdentityAllocator`.
    """


@_hookspec
def meshagent_register_policy_resolver(registry):
    """Offer policy resolvers (the ``policy-resolver`` slot).

    Same timing and contract as :func:`meshagent_register_kvstore`; ``factory(agent)`` returns
    a :class:`meshagent.policy.PolicyResolver`.
    """


@_hookspec
def meshagent_register_datapath(registry):
    """Offer datapaths (the optional ``datapath`` slot: empty means control plane only).

    Same timing and contract as :func:`meshagent_register_kvstore`; ``factory(agent)`` returns
    a :class:`meshagent.datapath.Datapath`. The core's datapath feed is its only caller, one
    call at a time: ``start``, endpoints-only batches until the agent has synced, one
    ``reconcile`` with the full state, then :class:`meshagent.datapath.DatapathBatch`es of net
    changes (each key once), applied in the order that class states.
    """


# --------------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------------


@_hookspec(historic=True)
def meshagent_configure(config, pluginmanager):
    """The options are parsed and the core ones validated; check and keep your own.

    Fires once, before the providers are built and before anything touches the system;
    historic.

    :param config: :class:`meshagent.runtime.config.Config`; ``config.get("<plugin>-name")``.
    :param pluginmanager: the agent's :class:`meshagent.hooks.manager.PluginManager`. A plugin
        that keeps per-agent state registers an object holding it here
        (``pluginmanager.register(obj, name="<plugin>.<what>")``); that object's hook
        implementations take part from then on. Several agents may share one process (tests).
    :returns: nothing.
    :raises: :class:`~meshagent.errors.UsageError` for an invalid plugin option: the agent
        exits 2 with that message and no side effect.
    """


@_hookspec
def meshagent_unconfigure(config):
    """The agent is exiting (after every controller stopped and providers closed).

    Fires once, in the reverse order of registration; the last hook a plugin sees.

    :param config: the same :class:`meshagent.runtime.config.Config` as at configure.
    :returns: nothing.
    :raises: should not; an exception is logged and the other plugins are still called.
    """


@_hookspec
def meshagent_controllers(agent):
    """Long-running work of the plugin, run by the agent in its one event loop.

    Fires once, after the providers are built and the API socket is open.

    :param agent: the running agent, as :class:`meshagent.hooks.view.AgentView`.
    :returns: a list of :class:`meshagent.runtime.controller.Controller` (or None). Each controller's
        ``run`` is awaited in the agent's task group, calls ``handle.ready()`` once its initial
        work is done, is restarted with backoff when it raises, and is cancelled at shutdown.
    :raises: should not; an exception stops start-up (exit 1) naming the plugin.
    """


@_hookspec
def meshagent_policy_source(agent):
    """Feed policies from elsewhere than the cluster's kvstore (e.g. Kubernetes CRDs).

    Fires once at agent start, when the core's policy repository starts its controllers;
    what the sources yield goes to the repository and from there to whichever resolver is
    loaded.

    :param agent: the :class:`meshagent.hooks.view.AgentView`.
    :returns: an async iterable of :class:`meshagent.plugin.PolicyUpdate` (an
        ``UPSERT`` with a parsed :class:`meshagent.policy.api.Policy`, or a ``DELETE`` with its
        key), consumed for the agent's lifetime by a controller of its own; or None.
    :raises: the iterable may raise: the error is shown in status and its controller restarts
        with backoff, iterating the same object again — an async generator is finished once it
        has raised, so a source meant to outlive errors handles them itself.
    """


@_hookspec
def meshagent_service_source(agent):
    """Feed local services from elsewhere than ``meshagent service apply`` (e.g. Kubernetes
    Services and EndpointSlices).

    Fires once at agent start.

    :param agent: the :class:`meshagent.hooks.view.AgentView`.
    :returns: an async iterable of :class:`meshagent.model.service.ServiceUpdate` (``UPSERT`` with a
        :class:`meshagent.model.service.Service` of the local cluster, or ``DELETE`` with one), consumed
        for the agent's lifetime by a controller of its own; or None.
    :raises: the iterable may raise: the error is shown in status and its controller restarts
        with backoff, iterating the same object again — an async generator is finished once it
        has raised, so a source meant to outlive errors handles them itself.
    """


@_hookspec
def meshagent_endpoint_labels(agent, namespace, pod_name):
    """Labels of a pod known elsewhere than the CNI call (e.g. the Kubernetes API).

    Fires when an endpoint for pod ``namespace/pod_name`` is created, and again when a plugin
    asks the agent to refresh that pod's labels (``agent.endpoints.refresh_labels``).

    :param agent: the :class:`meshagent.hooks.view.AgentView`.
    :param namespace: the pod's namespace.
    :param pod_name: the pod's name (never empty: endpoints without one are not asked about).
    :returns: None when the plugin does not know the pod, else an awaitable resolving to an
        iterable of source-prefixed labels (``k8s:app=db``); the agent adds them to the labels
        given at creation and derives the identity from the union.
    :raises: the awaitable may raise :class:`meshagent.errors.UsageError` naming why the pod's
        labels cannot be had; the endpoint create then fails with that message.
    """


# --------------------------------------------------------------------------------------------
# Events the agent publishes: observers only, called synchronously in the event loop
# --------------------------------------------------------------------------------------------


@_hookspec
def meshagent_node_changed(kind, node):
    """A node of this or a remote cluster appeared, changed or went away.

    :param kind: :class:`meshagent.events.ChangeKind` (``UPSERT`` or ``DELETE``).
    :param node: :class:`meshagent.model.node.Node`.
    :returns: nothing.
    :raises: should not; an exception is logged and counted, and the other plugins are still
        called. Must not block: hand slow work to a controller.
    """


@_hookspec
def meshagent_identity_changed(kind, identity):
    """A security identity (local or remote) was allocated, learned, or released.

    :param kind: :class:`meshagent.events.ChangeKind`.
    :param identity: :class:`meshagent.model.identity.Identity`.
    :returns: nothing.
    :raises: as :func:`meshagent_node_changed`.
    """


@_hookspec
def meshagent_ipcache_changed(kind, entry):
    """An IP (or CIDR) to identity mapping was added, changed or withdrawn.

    :param kind: :class:`meshagent.events.ChangeKind`.
    :param entry: :class:`meshagent.model.ipcache.IPCacheEntry`.
    :returns: nothing.
    :raises: as :func:`meshagent_node_changed`.
    """


@_hookspec
def meshagent_ipcache_changes(changes):
    """IP (or CIDR) to identity mappings changed: every change in the order it was made, many
    at once where they came together (a page of a remote's listing), so that a million
    entries are not a million calls. Each change is also given to
    :func:`meshagent_ipcache_changed`: implement one of the two.

    :param changes: a sequence of ``(kind, entry)`` pairs, a
        :class:`meshagent.events.ChangeKind` and a
        :class:`meshagent.model.ipcache.IPCacheEntry`; one prefix may change more than once
        in a sequence (the last change is the one in force).
    :returns: nothing.
    :raises: as :func:`meshagent_node_changed`.
    """


@_hookspec
def meshagent_endpoint_changed(kind, endpoint):
    """A local endpoint (pod) was created, regenerated or deleted.

    :param kind: :class:`meshagent.events.ChangeKind`.
    :param endpoint: :class:`meshagent.model.endpoint.Endpoint`.
    :returns: nothing.
    :raises: as :func:`meshagent_node_changed`.
    """


@_hookspec
def meshagent_policy_changed(kind, policy):
    """A policy document was imported, replaced or deleted.

    :param kind: :class:`meshagent.events.ChangeKind`.
    :param policy: :class:`meshagent.events.PolicyChange` (name, namespace, repository revision).
    :returns: nothing.
    :raises: as :func:`meshagent_node_changed`.
    """


@_hookspec
def meshagent_service_changed(kind, service):
    """A service (local, or a remote cluster's global one) was added, changed or removed.

    :param kind: :class:`meshagent.events.ChangeKind`.
    :param service: :class:`meshagent.model.service.Service`.
    :returns: nothing.
    :raises: as :func:`meshagent_node_changed`.
    """


# --------------------------------------------------------------------------------------------
# Visibility: status, metrics, API and CLI
# --------------------------------------------------------------------------------------------


@_hookspec
def meshagent_status(agent, verbose):
    """Contribute sections to ``meshagent status`` (KVStore, ClusterMesh, Datapath, ...).

    Fires on every status request (API ``GET /v1/status``); must be quick and not block.

    :param agent: the running :class:`meshagent.hooks.view.AgentView`.
    :param verbose: True when details were asked for; sections may skip costly details otherwise.
    :returns: a :class:`meshagent.runtime.status.StatusSection`, a list of them, or None.
    :raises: should not; an exception becomes a ``Failure`` section named after the plugin.
    """


@_hookspec
def meshagent_register_metrics(registry):
    """Register the plugin's Prometheus metrics.

    Fires once at agent start, before the controllers. Metrics are served only when
    ``--prometheus-serve-addr`` is set, but are always registered.

    :param registry: the agent's ``prometheus_client.CollectorRegistry``; pass it as
        ``registry=`` to each metric you create.
    :returns: nothing.
    :raises: a duplicate metric name raises ``ValueError``; start-up stops naming the plugin.
    """


@_hookspec
def meshagent_api_routes(agent):
    """Add paths to the agent API (HTTP/JSON over the unix socket).

    Fires once at agent start, before the socket opens.

    :param agent: the :class:`meshagent.hooks.view.AgentView`.
    :returns: a list of :class:`meshagent.plugin.Route` (method, path under ``/v1/``, an aiohttp
        handler), or None.
    :raises: a path another plugin or the core serves already raises
        :class:`~meshagent.errors.PluginError` naming both.
    """


@_hookspec
def meshagent_commands():
    """Add ``meshagent <command>`` sub-commands (e.g. ``meshagent bpf ...``).

    Fires when the CLI meets a command the core does not know, and for ``meshagent --help``;
    every installed plugin is loaded for it (no agent runs in that process).

    :returns: a list of :class:`meshagent.cli.Command`, or None.
    :raises: a command name already taken raises :class:`~meshagent.errors.PluginError`.
    """
