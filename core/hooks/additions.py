"""What a plugin adds to the agent's outer surfaces: API routes (``meshagent_api_routes``) and
CLI sub-commands (``meshagent_commands``). Light on purpose: the CLI imports it, so aiohttp is
only imported when a response is made."""

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from meshagent.model.jsonfields import to_jsonable

if TYPE_CHECKING:
    from aiohttp import web


@attrs.frozen
class Route:
    """An API route under ``/v1``; the handler takes an aiohttp request."""

    method: str
    path: str  # under /v1, e.g. "/endpoint"
    handler: "Callable[[web.Request], Awaitable[web.StreamResponse]]"


def json_response(value: Any, status: int = 200) -> "web.Response":
    """``value`` (attrs classes, addresses, enums included) as indented JSON."""
    from aiohttp import web
    return web.json_response(to_jsonable(value), status=status,
                             dumps=lambda v: json.dumps(v, indent=2))


@attrs.frozen
class Command:
    """A ``meshagent <name>`` sub-command (the core's or a plugin's)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns, the first row being the header (as Cilium's CLI)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def print_rows(output: str, header: tuple[str, ...], rows: list[tuple[str, ...]],
               as_json: object) -> int:
    """A command's answer: ``as_json`` for ``-o json``, else the table; exit status 0."""
    import json
    if output == "json":
        print(json.dumps(as_json, indent=2))
    else:
        print(format_table([header] + rows))
    return 0
