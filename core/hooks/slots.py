"""Provider slots: named registries that plugins fill and configuration picks from.

Four slots: kvstore (required), identity-allocator, policy-resolver and datapath. A plugin
offers providers by name from its ``meshagent_register_<slot>`` hook; ``--<slot>=NAME`` picks
one. A duplicate name is an error naming both plugins; with no choice made, the slot takes its
only provider, and more than one is an error: the outcome never depends on load order.
"""

from collections.abc import Callable
from typing import Any

import attrs

from meshagent.datapath import Datapath
from meshagent.errors import PluginError
from meshagent.hooks.answers import current_plugin
from meshagent.identity import IdentityAllocator
from meshagent.kvstore import KVStoreBackend
from meshagent.policy import PolicyResolver


@attrs.frozen
class Slot:
    name: str  # also the option that picks a provider: --<name>
    protocol: type
    required: bool

    @property
    def hook(self) -> str:
        return f"meshagent_register_{self.name.replace('-', '_')}"


KVSTORE = Slot("kvstore", KVStoreBackend, required=True)
IDENTITY_ALLOCATOR = Slot("identity-allocator", IdentityAllocator, required=False)
POLICY_RESOLVER = Slot("policy-resolver", PolicyResolver, required=False)
DATAPATH = Slot("datapath", Datapath, required=False)
SLOTS = (KVSTORE, IDENTITY_ALLOCATOR, POLICY_RESOLVER, DATAPATH)


@attrs.frozen
class Provider:
    name: str
    factory: Callable[[Any], Any]  # factory(agent) -> an object meeting the slot's protocol
    plugin: str


class Registry:
    """The providers offered for one slot, with the plugin that offered each.

    The slot's register hook is called once, through pluggy, with one registry for every
    plugin; ``register`` files each offer under the plugin whose implementation is running
    (:func:`meshagent.hooks.answers.current_plugin`). A name offered twice is an error naming
    both plugins.
    """

    def __init__(self, slot: Slot):
        self.slot = slot
        self.providers: dict[str, Provider] = {}

    def register(self, name: str, factory: Callable[[Any], Any]) -> None:
        plugin = current_plugin()
        if name in self.providers:
            a, b = sorted((self.providers[name].plugin, plugin))
            raise PluginError(
                f"{self.slot.name} provider {name!r} is registered by both plugin {a!r}"
                f" and plugin {b!r}"
            )
        self.providers[name] = Provider(name, factory, plugin)

    def select(self, wanted: str, could_fill: Callable[[], dict[str, list[str]]]) -> Provider | None:
        """The provider to use, or None for an optional slot nobody fills.

        ``could_fill`` is asked (only on error) which installed plugins offer which providers,
        so the message can say what to add to ``--plugins``.
        """
        if wanted:
            if wanted in self.providers:
                return self.providers[wanted]
            raise PluginError(
                f"--{self.slot.name}={wanted}: no loaded plugin offers it;"
                f" loaded: {_names(self.providers) or 'none'}; {_hint(could_fill())}"
            )
        if len(self.providers) == 1:
            return next(iter(self.providers.values()))
        if len(self.providers) > 1:
            raise PluginError(
                f"slot {self.slot.name!r} has several providers ({_names(self.providers)}):"
                f" choose one with --{self.slot.name}=NAME"
            )
        if self.slot.required:
            raise PluginError(f"slot {self.slot.name!r} is empty; {_hint(could_fill())}")
        return None


class Offers(Registry):
    """A registry that only records which plugin offers which provider names: what
    ``meshagent plugins`` lists and an error's hint, where two installed plugins may offer
    one name without that being an error."""

    def __init__(self, slot: Slot):
        super().__init__(slot)
        self.by_plugin: dict[str, list[str]] = {}

    def register(self, name: str, factory: Callable[[Any], Any]) -> None:
        self.by_plugin.setdefault(current_plugin(), []).append(name)


class BuiltProviders:
    """A slot's providers built on first use, once each, by name (None: ``default``): the
    kvstore backends a clustermesh file may name (``kvstore: consul``)."""

    def __init__(self, registry: Registry, default: str, context: Any):
        self.registry = registry
        self.default = default
        self.context = context  # what the factories get: the agent's view, or None
        self._built: dict[str, Any] = {}

    def named(self, name: str | None) -> Any:
        name = name or self.default
        if name not in self._built:
            provider = self.registry.providers.get(name)
            if provider is None:
                loaded = ", ".join(sorted(self.registry.providers)) or "none"
                raise PluginError(f"no loaded plugin offers {self.registry.slot.name} {name!r}"
                                  f" (loaded: {loaded})")
            self._built[name] = check_provider(self.registry.slot, provider,
                                               provider.factory(self.context))
        return self._built[name]


def _names(providers: dict[str, Provider]) -> str:
    return ", ".join(f"{n} (plugin {p.plugin})" for n, p in sorted(providers.items()))


def _hint(offers: dict[str, list[str]]) -> str:
    if not offers:
        return "no installed plugin can fill it"
    listed = ", ".join(f"{plugin} ({', '.join(names)})" for plugin, names in sorted(offers.items()))
    return f"plugins that could fill it: {listed}; add one to --plugins"


def check_provider(slot: Slot, provider: Provider, built: Any) -> Any:
    """``built`` if it meets the slot's protocol; else a PluginError naming the plugin and
    what is missing (at start-up, not at the first call that needs it). The contract is named
    where plugin authors import it from."""
    if isinstance(built, slot.protocol):
        return built
    missing = sorted(name for name in _members(slot.protocol) if not hasattr(built, name))
    raise PluginError(
        f"{slot.name} provider {provider.name!r} of plugin {provider.plugin!r} does not meet"
        f" meshagent.plugin.{slot.protocol.__qualname__}: missing"
        f" {', '.join(missing) or '?'}")


def _members(protocol: type) -> set[str]:
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass is object or klass.__name__ in ("Protocol", "Generic"):
            continue
        names.update(n for n in vars(klass) if not n.startswith("_"))
        names.update(getattr(klass, "__annotations__", {}))
    return names
