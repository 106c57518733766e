"""What each hook implementation answered, and for which plugin.

Every hook is called through pluggy's caller (``pm.hook.<name>(...)``), so wrappers,
``tryfirst``/``trylast``, tracing and call monitoring work as pluggy documents them. The project
also promises two things pluggy alone does not: one implementation that raises does not stop
the others, and every result stays attributed to the plugin that gave it (status sections,
controllers, providers, routes). Both are per-implementation properties, and a wrapper cannot
give them: pluggy stops calling implementations at the first exception, and the list it
collects drops ``None`` and says nothing of who answered what.

So the plugin manager installs :func:`answering` around each plain implementation of a
non-historic hook when its plugin registers (wrappers and the historic hooks ``addoption`` and
``configure`` are left as they are: their errors stop start-up). pluggy still decides which
implementations run and in what order, and calls the shim in place of the function; the shim
calls the function, catches an ``Exception``, and hands pluggy an :class:`Answer`: the plugin's
registered name with the value or the error. An implementation that returned None and did not
raise answers None, so pluggy drops it as before (and a firstresult hook still takes the first
real answer). Wrappers therefore see the list of ``Answer`` s; the typed facade
(:class:`meshagent.hooks.manager.Hooks`) decides per hook what an error means (logged and
counted for an observer, a ``Failure`` section for status, raised for the rest).

While an implementation runs, :func:`current_plugin` names its plugin: a registry filled through
a side effect (``registry.register(name, factory)``) files each offer under it.
"""

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import attrs

_current_plugin: contextvars.ContextVar[str] = contextvars.ContextVar(
    "meshagent_current_plugin", default="?")


@attrs.frozen
class Answer:
    """One hook implementation's answer: its plugin's registered name and its return value, or
    the exception it raised. A wrapper that adds to a collected hook's result adds one of these
    with its own plugin's name."""

    plugin: str
    value: Any = None
    error: Exception | None = None

    def result(self) -> Any:
        """The value, or the implementation's exception raised again."""
        if self.error is not None:
            raise self.error
        return self.value


def current_plugin() -> str:
    """The registered name of the plugin whose hook implementation is running (``?`` outside
    one)."""
    return _current_plugin.get()


def answering(plugin: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (a plain hook implementation of ``plugin``) as pluggy will call it: it
    answers with an :class:`Answer` (or None) and never raises an ``Exception``."""
    @functools.wraps(function)  # tracebacks and inspect still show the implementation
    def shim(*args: Any, **kwargs: Any) -> Answer | None:
        token = _current_plugin.set(plugin)
        try:
            value = function(*args, **kwargs)
        except Exception as exc:
            return Answer(plugin, error=exc)
        finally:
            _current_plugin.reset(token)
        return None if value is None else Answer(plugin, value)
    return shim
