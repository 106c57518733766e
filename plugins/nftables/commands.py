"""``meshagent nft ...``: the nftables datapath's table, read from the kernel directly (so it
works while the agent is down), as ``meshagent bpf ...`` reads the eBPF maps."""

import argparse
import json
import os
import re

from meshagent.plugin import MATCH_TEXT, Command, MeshagentError, match_of, print_rows
from meshagent.plugins.nftables.ruleset import MATCH_NAMES

CLASSID = re.compile(r"^0:[0-9a-f]+$")
#: a policy element's target chain: what it decides, and the match type it names
#: (an allow names the deciding entry's prefix length, a deny its match type: ruleset.py)
ALLOW_TARGET = re.compile(r"^(anyafter|anyafternp|anyok)_([0-9]+)_")
DENY_TARGET = re.compile(r"^drop_policy_deny_([a-z0-9]+)_")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", default=os.environ.get("MESHAGENT_NFTABLES_TABLE",
                                                          "meshagent"),
                        help="the agent's netdev table [env MESHAGENT_NFTABLES_TABLE]")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")


def _args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    ipc = sub.add_parser("ipcache", help="address ranges -> identity (the flattened ipcache)")
    ipc.add_argument("action", choices=("list",))
    pol = sub.add_parser("policy", help="one endpoint's policy map elements")
    pol.add_argument("action", choices=("get",))
    pol.add_argument("endpoint", type=int)
    sub.add_parser("counters", help="packets per verdict reason")
    for p in sub.choices.values():
        _common(p)


def _nft(text: str) -> list[dict]:
    try:
        import nftables
    except ImportError as exc:
        raise MeshagentError(f"python3-nftables is not installed ({exc})") from None
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, err = nft.cmd(text)
    if rc != 0:
        raise MeshagentError(f"nft {text!r}: {err.strip()}")
    return json.loads(out or '{"nftables": []}')["nftables"]


def _maps(table: str) -> dict[str, list]:
    """Every map of the table with its elements, from one listing (libnftables reads the
    whole table for any listing of it)."""
    return {item["map"]["name"]: item["map"].get("elem", [])
            for item in _nft(f"list table netdev {table}") if "map" in item}


def _text(value) -> str:
    """An element's key or value as nft writes it (ranges, concatenations, verdicts)."""
    if isinstance(value, dict):
        if "range" in value:
            return "-".join(_text(v) for v in value["range"])
        if "concat" in value:
            return " . ".join(_text(v) for v in value["concat"])
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "goto" in value:
            return f"goto {value['goto']['target']}"
        if "elem" in value:
            return _text(value["elem"]["val"])
    if isinstance(value, str) and CLASSID.match(value):  # ports travel as classids
        return str(int(value[2:], 16))
    if value == "none":  # classid 0: port 0
        return "0"
    return str(value)


def _run(args: argparse.Namespace) -> int:
    if args.what == "counters":
        from meshagent.plugin import REASON_TEXT
        from meshagent.plugins.nftables.netlink import read_counters
        try:
            raw = read_counters("netdev", args.table)
        except OSError as exc:
            raise MeshagentError(f"table netdev {args.table}: {exc}") from None
        rows = [{"reason": text, "packets": raw.get(f"r_{reason}", 0)}
                for reason, text in REASON_TEXT.items()]
        return print_rows(args.output, ("REASON", "PACKETS"),
                          [(r["reason"], str(r["packets"])) for r in rows], rows)
    maps = _maps(args.table)
    if args.what == "ipcache":
        rows = [{"range": _text(key), "identity": value}
                for family in (4, 6) for key, value in maps.get(f"ipcache{family}", [])]
        return print_rows(args.output, ("RANGE", "IDENTITY"),
                          [(r["range"], str(r["identity"])) for r in rows], rows)
    rows = []
    for family in (4, 6):
        for kind in ("spec", "any", "spnp", "anynp"):
            for direction in ("in", "out"):
                name = f"{kind}{family}_{args.endpoint}_{direction}"
                for key, value in maps.get(name, []):
                    rows.append({"map": name, "key": _text(key), **_decision(_text(value))})
    return print_rows(args.output, ("MAP", "IDENTITY . PROTOCOL . PORTS", "VERDICT", "MATCH"),
                      [(r["map"], r["key"], r["verdict"], r["match"]) for r in rows], rows)


def _decision(verdict: str) -> dict:
    """An element's ``goto <chain>`` as what it decides and the match type it names."""
    chain = verdict.removeprefix("goto ")
    if found := ALLOW_TARGET.match(chain):
        match = match_of(found[1] != "anyok", int(found[2]))
        return {"verdict": "allow", "match": MATCH_TEXT[match]}
    names = {name: number for number, name in MATCH_NAMES.items()}
    if (found := DENY_TARGET.match(chain)) and found[1] in names:
        return {"verdict": "deny", "match": MATCH_TEXT[names[found[1]]]}
    return {"verdict": verdict, "match": "?"}


COMMANDS = (
    Command("nft", "read the nftables datapath's table directly (works while the agent is"
            " down)", _args, _run),
)
