"""Finding, selecting and loading plugins, and calling their hooks.

Built-in and third-party plugins come from one entry-point group, ``meshagent.plugins``. The
agent's ``--plugins`` is an allow-list: every other plugin is blocked before it is imported.
Each agent (and each CLI invocation) gets its own plugin manager; nothing loads at import time.
"""

import difflib
import importlib.metadata
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import pluggy

from meshagent import PROJECT
from meshagent.errors import PluginError
from meshagent.events import ChangeKind
from meshagent.hooks import specs as hookspecs
from meshagent.hooks.answers import Answer, answering
from meshagent.hooks.slots import SLOTS, Offers, Registry, Slot

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
    unknown_hooks: tuple[str, ...] = ()  # implemented, but no spec: an agent refuses to start


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
        self.pm = _Pluggy(PROJECT)
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
        return inspector.hooks.offers(slot)

    def unknown_hooks(self, plugin: object) -> list[str]:
        """The hooks ``plugin`` implements that no spec defines (``optionalhook`` excepted):
        pluggy would never call them."""
        return sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or ()
                      if not caller.has_spec() and any(
                          impl.plugin is plugin and not impl.optionalhook
                          for impl in caller.get_hookimpls()))

    def check_pending(self) -> None:
        """pluggy's ``check_pending``, as a start-up refusal: a plugin implementing a hook no
        spec defines (a misspelling such as ``meshagent_ipcache_change``) would silently do
        nothing, so it is a PluginError (exit 2) naming the plugin as registered and the hook.
        Run once every plugin and core component has registered."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin)
            hooks = self.unknown_hooks(exc.plugin)
            known = [n for n in dir(hookspecs) if n.startswith(f"{PROJECT}_")]
            # two guesses: a misspelling may be one letter from two hooks (..._changed/_changes)
            guesses = [g for hook in hooks for g in difflib.get_close_matches(hook, known, n=2)]
            raise PluginError(
                f"plugin {name!r} implements unknown hook{'s' if len(hooks) > 1 else ''}"
                f" {', '.join(hooks)}: no {PROJECT} hook has that name"
                + (f" (did you mean {' or '.join(guesses)}?)" if guesses else "")
                + "; see docs/plugin-hooks.md, or mark it @hookimpl(optionalhook=True)"
            ) from exc

    def infos(self) -> list[PluginInfo]:
        status_of_loaded = "available" if self.inspecting else "active"
        rows = []
        slots_by_plugin: dict[str, dict[str, list[str]]] = {}
        for slot in SLOTS:
            for plugin, names in self.hooks.offers(slot).items():
                slots_by_plugin.setdefault(plugin, {})[slot.name] = names
        for name, source in sorted(self.available.items()):
            plugin = self.pm.get_plugin(name)
            hooks = tuple(sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])) if plugin else ()
            rows.append(PluginInfo(
                name=name, origin=source.origin, distribution=source.distribution,
                version=source.version,
                status=status_of_loaded if plugin is not None else "blocked",
                hooks=hooks, provides=slots_by_plugin.get(name, {}),
                unknown_hooks=tuple(self.unknown_hooks(plugin)) if plugin else (),
            ))
        return rows


class _Pluggy(pluggy.PluginManager):
    """pluggy's plugin manager, except that each plain implementation of a non-historic hook
    is called through :func:`meshagent.hooks.answers.answering` (see that module): pluggy
    still orders and calls every implementation and wrapper, and each implementation answers
    for its plugin without stopping the others. ``register`` is the one way in, for the
    entry points, the core's components and the objects plugins register alike."""

    def register(self, plugin: object, name: str | None = None) -> str | None:
        registered = super().register(plugin, name)
        if registered is None:  # blocked
            return None
        for caller in self.get_hookcallers(plugin) or ():
            if caller.is_historic():
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    # what pluggy calls for this implementation from now on
                    impl.function = answering(registered, impl.function)  # type: ignore[misc]
        return registered


def _normalize(dist: str) -> str:
    return dist.lower().replace("_", "-")


class Hooks:
    """The typed facade the agent calls hooks through, always with keyword arguments.

    Every call goes through pluggy's caller (``pm.hook.<name>(...)``); what comes back is one
    :class:`~meshagent.hooks.answers.Answer` per implementation that answered (see
    :mod:`meshagent.hooks.answers`), and each method here says what an error means for its
    hook: logged and counted for an observer, a ``Failure`` section for status, raised again
    (stopping start-up) for the rest.
    """

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.errors = 0  # exceptions raised by observer hooks; exported as a metric

    # -- registration -------------------------------------------------------------------------

    def addoption(self, parser: Any) -> None:
        self.pm.hook.meshagent_addoption.call_historic(kwargs=dict(parser=parser))

    def register_providers(self, slot: Slot) -> Registry:
        """One registry with every plugin's providers; a duplicate name raises PluginError."""
        registry = Registry(slot)
        self._results(slot.hook, registry=registry)
        return registry

    def offers(self, slot: Slot) -> dict[str, list[str]]:
        """The provider names each plugin offers for ``slot`` (two may offer one name)."""
        offers = Offers(slot)
        self._results(slot.hook, registry=offers)
        return {plugin: sorted(names) for plugin, names in offers.by_plugin.items()}

    def register_metrics(self, registry: Any) -> None:
        for answer in self._call("meshagent_register_metrics", registry=registry):
            if isinstance(answer.error, ValueError):
                raise PluginError(f"plugin {answer.plugin!r} metrics: {answer.error}") \
                    from answer.error
            answer.result()

    # -- lifecycle -----------------------------------------------------------------------------

    def configure(self, config: Any, pluginmanager: "PluginManager") -> None:
        self.pm.hook.meshagent_configure.call_historic(
            kwargs=dict(config=config, pluginmanager=pluginmanager))

    def unconfigure(self, config: Any) -> None:
        self._notify("meshagent_unconfigure", config=config)

    def controllers(self, agent: Any) -> list[tuple[str, Any]]:
        """``(plugin name, controller)`` for every controller the plugins return."""
        return self._results("meshagent_controllers", agent=agent)

    # -- events --------------------------------------------------------------------------------

    def node_changed(self, kind: ChangeKind, node: Any) -> None:
        self._notify("meshagent_node_changed", kind=kind, node=node)

    def identity_changed(self, kind: ChangeKind, identity: Any) -> None:
        self._notify("meshagent_identity_changed", kind=kind, identity=identity)

    def ipcache_changed(self, kind: ChangeKind, entry: Any) -> None:
        self.ipcache_changes([(kind, entry)])

    def ipcache_changes(self, changes: list[tuple[ChangeKind, Any]]) -> None:
        """Every change to the batch hook at once, then one by one to the single-change hook
        (where a plugin implements it)."""
        self._notify("meshagent_ipcache_changes", changes=changes)
        if self.pm.hook.meshagent_ipcache_changed.get_hookimpls():
            for kind, entry in changes:
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
        for answer in self._call("meshagent_status", agent=agent, verbose=verbose):
            if answer.error is not None:  # one plugin's bug must not hide everyone's status
                log.error("status hook of plugin %s failed", answer.plugin,
                          exc_info=answer.error)
                out.append((answer.plugin, answer.error))
            else:
                out.extend((answer.plugin, s) for s in _as_list(answer.value))
        return out

    def service_sources(self, agent: Any) -> list[tuple[str, Any]]:
        return self._results("meshagent_service_source", agent=agent)

    def policy_sources(self, agent: Any) -> list[tuple[str, Any]]:
        return self._results("meshagent_policy_source", agent=agent)

    async def endpoint_labels(self, agent: Any, namespace: str, pod_name: str) -> frozenset[str]:
        """The union of what every plugin knows of the pod's labels."""
        labels: set[str] = set()
        for _, awaitable in self._results("meshagent_endpoint_labels", agent=agent,
                                          namespace=namespace, pod_name=pod_name):
            labels.update(await awaitable)
        return frozenset(labels)

    def api_routes(self, agent: Any) -> list[tuple[str, Any]]:
        return self._results("meshagent_api_routes", agent=agent)

    def commands(self) -> list[tuple[str, Any]]:
        return self._results("meshagent_commands")

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, hook_name: str, **kwargs: Any) -> list[Answer]:
        """Call the hook through pluggy: the answers in pluggy's call order (the last
        registered first, ``tryfirst`` before, ``trylast`` after), as wrappers left them."""
        answers = getattr(self.pm.hook, hook_name)(**kwargs)
        strays = [a for a in answers if not isinstance(a, Answer)]
        if strays:
            wrappers = sorted({impl.plugin_name for impl in getattr(self.pm.hook, hook_name)
                               .get_hookimpls() if impl.wrapper or impl.hookwrapper})
            raise PluginError(
                f"{hook_name}: a wrapper (plugin {', '.join(wrappers) or '?'}) left"
                f" {strays[0]!r} in the result, not a meshagent.plugin.Answer")
        return answers

    def _results(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """``(plugin name, item)`` for every item of every answer (a list answer counts item by
        item); the first implementation's error is raised again."""
        return [(answer.plugin, item) for answer in self._call(hook_name, **kwargs)
                for item in _as_list(answer.result())]

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every observer; one that raises is logged and counted, the rest still run."""
        for answer in self._call(hook_name, **kwargs):
            if answer.error is not None:
                self.errors += 1
                log.error("plugin %s failed in %s", answer.plugin, hook_name,
                          exc_info=answer.error)


def _as_list(result: Any) -> Iterable[Any]:
    if result is None:
        return ()
    if isinstance(result, list):
        return result
    return (result,)
