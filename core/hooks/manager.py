"""Finding, selecting and loading plugins, and calling their hooks.

Built-in and third-party plugins come from one entry-point group, ``meshagent.plugins``. The
agent's ``--plugins`` is an allow-list: every other plugin is blocked before it is imported.
Each agent (and each CLI invocation) gets its own plugin manager; nothing loads at import time.
"""

import importlib.metadata
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import pluggy

from meshagent import PROJECT
from meshagent.errors import PluginError
from meshagent.events import ChangeKind
from meshagent.hooks import specs as hookspecs
from meshagent.hooks.slots import SLOTS, Registry, Slot

ENTRY_POINT_GROUP = "meshagent.plugins"

log = logging.getLogger(__name__)


@attrs.frozen
class PluginSource:
    """An installed plugin, known from its entry point before it is imported."""

    name: str
    entry_point: importlib.metadata.EntryPoint
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.distribution == PROJECT

    @property
    def origin(self) -> str:
        return "builtin" if self.builtin else f"{self.distribution} {self.version}"


@attrs.frozen
class PluginInfo:
    """One row of ``meshagent plugins``."""

    name: str
    origin: str
    distribution: str
    version: str
    status: str  # active | available | blocked
    hooks: tuple[str, ...]
    provides: dict[str, list[str]]  # slot -> provider names


def discover() -> dict[str, PluginSource]:
    """Every installed plugin by name; two distributions claiming one name is an error."""
    found: dict[str, PluginSource] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        source = PluginSource(ep.name, ep, dist, version)
        previous = found.get(ep.name)
        if previous and _normalize(previous.distribution) != _normalize(dist):
            raise PluginError(
                f"plugin name {ep.name!r} is claimed by two distributions:"
                f" {previous.origin} ({previous.entry_point.value})"
                f" and {source.origin} ({ep.value})"
            )
        found.setdefault(ep.name, source)
    return found


def describe_available(available: dict[str, PluginSource]) -> str:
    return ", ".join(f"{n} ({s.origin})" for n, s in sorted(available.items())) or "none"


class PluginManager:
    """Loads the selected plugins (or all, for inspection) into a fresh pluggy manager."""

    def __init__(self, selected: Sequence[str] | None = None,
                 available: dict[str, PluginSource] | None = None):
        self.available = discover() if available is None else available
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.selected = tuple(self.available) if selected is None else tuple(selected)
        self.inspecting = selected is None
        unknown = [name for name in self.selected if name not in self.available]
        if unknown:
            raise PluginError(
                f"unknown plugin{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                f" in --plugins; available: {describe_available(self.available)}"
            )
        for name in self.available:
            if name not in self.selected:
                self.pm.set_blocked(name)
        for name in self.selected:
            self._load(self.available[name])
        self.hooks = Hooks(self.pm)

    def _load(self, source: PluginSource) -> None:
        if self.pm.get_plugin(source.name) is not None:
            return
        try:
            plugin = source.entry_point.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {source.name!r} ({source.origin}) failed to import:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        self.pm.register(plugin, name=source.name)

    def register(self, plugin: object, name: str) -> None:
        """Add a plugin object directly: the core's own hooks, or a test's temporary plugin."""
        self.pm.register(plugin, name=name)

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)

    def offers(self, slot: Slot) -> dict[str, list[str]]:
        """Which installed plugins (loaded or not) offer providers for ``slot``.

        Imports the unselected ones into a throwaway manager: only used to word an error
        message or a listing, never by a running agent.
        """
        inspector = self if self.inspecting else PluginManager(None, self.available)
        return {
            plugin: sorted(registry.providers)
            for plugin, registry in inspector.hooks.registries_by_plugin(slot).items()
            if registry.providers
        }

    def infos(self) -> list[PluginInfo]:
        status_of_loaded = "available" if self.inspecting else "active"
        rows = []
        slots_by_plugin: dict[str, dict[str, list[str]]] = {}
        for slot in SLOTS:
            for plugin, registry in self.hooks.registries_by_plugin(slot).items():
                if registry.providers:
                    slots_by_plugin.setdefault(plugin, {})[slot.name] = sorted(registry.providers)
        for name, source in sorted(self.available.items()):
            plugin = self.pm.get_plugin(name)
            hooks = tuple(sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])) if plugin else ()
            rows.append(PluginInfo(
                name=name, origin=source.origin, distribution=source.distribution,
                version=source.version,
                status=status_of_loaded if plugin is not None else "blocked",
                hooks=hooks, provides=slots_by_plugin.get(name, {}),
            ))
        return rows


def _normalize(dist: str) -> str:
    return dist.lower().replace("_", "-")


class Hooks:
    """The typed facade the agent calls hooks through, always with keyword arguments."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.errors = 0  # exceptions raised by observer hooks; exported as a metric

    # -- registration -------------------------------------------------------------------------

    def addoption(self, parser: Any) -> None:
        self.pm.hook.meshagent_addoption.call_historic(kwargs=dict(parser=parser))

    def registries_by_plugin(self, slot: Slot) -> dict[str, Registry]:
        """Call one slot's register hook plugin by plugin, each into a registry of its own."""
        out = {}
        for impl in self._impls(slot.hook):
            registry = Registry(slot)
            registry.current_plugin = impl.plugin_name
            impl.function(**self._args(impl, registry=registry))
            out[impl.plugin_name] = registry
        return out

    def register_providers(self, slot: Slot) -> Registry:
        """One registry with every plugin's providers; a duplicate name raises PluginError."""
        merged = Registry(slot)
        for plugin, registry in self.registries_by_plugin(slot).items():
            merged.current_plugin = plugin
            for provider in registry.providers.values():
                merged.register(provider.name, provider.factory)
        return merged

    def register_metrics(self, registry: Any) -> None:
        for impl in self._impls("meshagent_register_metrics"):
            try:
                impl.function(**self._args(impl, registry=registry))
            except ValueError as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} metrics: {exc}") from exc

    # -- lifecycle -----------------------------------------------------------------------------

    def configure(self, config: Any, pluginmanager: "PluginManager") -> None:
        self.pm.hook.meshagent_configure.call_historic(
            kwargs=dict(config=config, pluginmanager=pluginmanager))

    def unconfigure(self, config: Any) -> None:
        self._notify("meshagent_unconfigure", config=config)

    def controllers(self, agent: Any) -> list[tuple[str, Any]]:
        """``(plugin name, controller)`` for every controller the plugins return."""
        return list(self._collect("meshagent_controllers", agent=agent))

    # -- events --------------------------------------------------------------------------------

    def node_changed(self, kind: ChangeKind, node: Any) -> None:
        self._notify("meshagent_node_changed", kind=kind, node=node)

    def identity_changed(self, kind: ChangeKind, identity: Any) -> None:
        self._notify("meshagent_identity_changed", kind=kind, identity=identity)

    def ipcache_changed(self, kind: ChangeKind, entry: Any) -> None:
        self._notify("meshagent_ipcache_changed", kind=kind, entry=entry)

    def endpoint_changed(self, kind: ChangeKind, endpoint: Any) -> None:
        self._notify("meshagent_endpoint_changed", kind=kind, endpoint=endpoint)

    def policy_changed(self, kind: ChangeKind, policy: Any) -> None:
        self._notify("meshagent_policy_changed", kind=kind, policy=policy)

    def service_changed(self, kind: ChangeKind, service: Any) -> None:
        self._notify("meshagent_service_changed", kind=kind, service=service)

    # -- visibility ----------------------------------------------------------------------------

    def status(self, agent: Any, verbose: bool) -> list[tuple[str, Any]]:
        """``(plugin name, section or exception)`` from every plugin's status hook."""
        out = []
        for impl in self._impls("meshagent_status"):
            try:
                result = impl.function(**self._args(impl, agent=agent, verbose=verbose))
            except Exception as exc:  # one plugin's bug must not hide everyone's status
                log.exception("status hook of plugin %s failed", impl.plugin_name)
                out.append((impl.plugin_name, exc))
                continue
            out.extend((impl.plugin_name, s) for s in _as_list(result))
        return out

    def service_sources(self, agent: Any) -> list[tuple[str, Any]]:
        return list(self._collect("meshagent_service_source", agent=agent))

    def policy_sources(self, agent: Any) -> list[tuple[str, Any]]:
        return list(self._collect("meshagent_policy_source", agent=agent))

    async def endpoint_labels(self, agent: Any, namespace: str, pod_name: str) -> frozenset[str]:
        """The union of what every plugin knows of the pod's labels."""
        labels: set[str] = set()
        for _, awaitable in list(self._collect("meshagent_endpoint_labels", agent=agent,
                                               namespace=namespace, pod_name=pod_name)):
            labels.update(await awaitable)
        return frozenset(labels)

    def api_routes(self, agent: Any) -> list[tuple[str, Any]]:
        return list(self._collect("meshagent_api_routes", agent=agent))

    def commands(self) -> list[tuple[str, Any]]:
        return list(self._collect("meshagent_commands"))

    # -- plumbing ------------------------------------------------------------------------------

    def _impls(self, hook_name: str) -> list[pluggy.HookImpl]:
        # pluggy calls the last registered first; keep that order for our per-plugin calls
        return list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))

    @staticmethod
    def _args(impl: pluggy.HookImpl, **kwargs: Any) -> dict[str, Any]:
        return {name: kwargs[name] for name in impl.argnames}

    def _collect(self, hook_name: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        for impl in self._impls(hook_name):
            for item in _as_list(impl.function(**self._args(impl, **kwargs))):
                yield impl.plugin_name, item

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every observer; one that raises is logged and counted, the rest still run."""
        for impl in self._impls(hook_name):
            try:
                impl.function(**self._args(impl, **kwargs))
            except Exception:
                self.errors += 1
                log.exception("plugin %s failed in %s", impl.plugin_name, hook_name)


def _as_list(result: Any) -> Iterable[Any]:
    if result is None:
        return ()
    if isinstance(result, list):
        return result
    return (result,)
