"""Write docs/plugin-hooks.md from the hook specs, so the docs and the code cannot drift.

Run: .venv/bin/python scripts/hookdocs.py > docs/plugin-hooks.md
(tests/test_docs.py fails when the file is out of date).
"""

import inspect
import re

from meshagent.hooks import specs as hookspecs

INTRO = """\
# Plugin hooks

Generated from `core/hooks/specs.py` by `scripts/hookdocs.py`; do not edit by hand.

Implement a hook with `@meshagent.hookimpl` on a function (or method) of the same name in your
plugin. An implementation may take any subset of the arguments. All hooks are synchronous;
long-running work goes into a `Controller` returned from `meshagent_controllers`. Hooks are
called through pluggy's caller: `tryfirst`/`trylast` and `wrapper=True` implementations work (a
wrapper sees one `Answer(plugin, value, error)` per implementation), and an implementation of
a hook not listed here stops start-up unless marked `optionalhook=True`. See
[writing-plugins.md](writing-plugins.md) for a walk-through and "Hook order, wrappers and
unknown hooks" there.
"""


def _markdown(text: str) -> str:
    text = re.sub(r":(?:class|func|data|meth|mod):`~?([\w.]+)`",
                  lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"^:param (\w+):", r"- **\1**:", text, flags=re.M)
    text = re.sub(r"^:returns:", "- **returns**:", text, flags=re.M)
    text = re.sub(r"^:raises:", "- **raises**:", text, flags=re.M)
    return text


def render() -> str:
    out = [INTRO]
    section = None
    source = inspect.getsource(hookspecs)
    banners = {m.end(): m.group(1) for m in re.finditer(r"^# (\w[^\n]*)\n# -+", source, re.M)}
    specs = [(source.index(f"def {n}("), n, f) for n, f in
             inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("meshagent_")]
    for position, name, func in sorted(specs):
        banner = [title for end, title in banners.items() if end < position]
        if banner and banner[-1] != section:
            section = banner[-1]
            out.append(f"## {section}\n")
        opts = getattr(func, "meshagent_spec", {}) or {}
        flags = [flag for flag in ("historic", "firstresult") if opts.get(flag)]
        signature = f"{name}({', '.join(inspect.signature(func).parameters)})"
        out.append(f"### `{signature}`\n")
        if flags:
            out.append(f"*{', '.join(flags)}*\n")
        out.append(_markdown(inspect.cleandoc(func.__doc__)) + "\n")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
