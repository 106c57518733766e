"""What the command-line tools print: JSON, and a status report from the API. Shared by
``meshagent`` and ``meshagent kvstoremesh`` (below both: neither process root imports the
other)."""

import argparse
import json
from typing import Any

from meshagent.client import AgentClient
from meshagent.model.jsonfields import to_jsonable
from meshagent.runtime.status import Health, StatusReport, StatusSection, render_text


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")


def print_json(value: Any) -> None:
    print(json.dumps(to_jsonable(value), indent=2))


def status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show each section's details")
    add_output(parser)


def print_status(client: AgentClient, output: str, verbose: bool) -> int:
    """``meshagent status`` (and ``meshagent kvstoremesh status``): 0 when healthy."""
    body = client.get("/status", params={"verbose": str(verbose)})
    report = status_report_from_json(body)
    if output == "json":
        print_json(body)
    else:
        print(render_text(report, verbose))
    return 0 if report.healthy else 1


def status_report_from_json(body: dict) -> StatusReport:
    sections = tuple(
        StatusSection(s["name"], Health(s["health"]), s["summary"], s.get("details", ()),
                      s.get("plugin", ""))
        for s in body["sections"]
    )
    fields = {k: body[k] for k in ("version", "cluster_name", "cluster_id", "node_name",
                                   "uptime_seconds", "ready")}
    return StatusReport(sections=sections, **fields)


