"""``meshagent``: with no command it runs the agent; with one it talks to a running agent.

``meshagent --plugins etcd,ebpf [options]`` runs the agent. ``meshagent status``,
``meshagent plugins`` and ``meshagent config`` ask it over the API socket; plugins add commands
of their own through the ``meshagent_commands`` hook.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from meshagent.client import DEFAULT_SOCKET, AgentClient
from meshagent.errors import AgentNotRunning, MeshagentError, UsageError
from meshagent.hooks.additions import Command, format_table
from meshagent.hooks.startup import load_config
from meshagent.model.jsonfields import to_jsonable
from meshagent.runtime.clioutput import add_output, print_json, print_status, status_args

if TYPE_CHECKING:
    from meshagent.daemon.agent import Agent

log = logging.getLogger("meshagent")

AGENT_HELP = """\
Run the meshagent node agent: meshagent --plugins etcd,ebpf [options].
Every option is also read from MESHAGENT_<OPTION> and from <config-dir>/<option>
(flag > environment > config dir > default).

"""


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    try:
        if argv and argv[0] == "kvstoremesh":  # a process of its own, and its status
            from meshagent.kvstoremesh.command import main as kvstoremesh_main
            return kvstoremesh_main(argv[1:], environ)
        if argv and not argv[0].startswith("-"):
            return run_command(argv, environ)
        return run_agent(argv, environ)
    except MeshagentError as exc:
        print(f"meshagent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


# ------------------------------------------------------------------------------------------
# the agent
# ------------------------------------------------------------------------------------------


def build_agent(argv: Sequence[str], environ: Mapping[str, str],
                extra_plugins: Sequence[tuple[str, object]] = ()) -> "Agent":
    """Everything up to the first side effect: plugins, options, validation, provider choice."""
    # imported here: a client command must not pay for what only the agent uses
    from meshagent.daemon.agent import Agent
    config, plugins = load_config(argv, environ, AGENT_HELP + _commands_epilog(),
                                  extra_plugins=extra_plugins)
    return Agent(config, plugins)


def run_agent(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    from meshagent.daemon.agent import run_forever
    from meshagent.runtime.logsetup import configure_logging
    agent = build_agent(argv, environ)
    configure_logging(agent.config.get("log-format"), agent.config.get("debug"))
    for name in agent.config.unknown_config_files:
        log.warning("config-dir file %r names no option of the loaded plugins; ignored", name)
    run_forever(agent)
    return 0


def _commands_epilog() -> str:
    names = ", ".join(c.name for c in CORE_COMMANDS)
    return f"commands (talk to a running agent): {names}; 'meshagent COMMAND --help' for more"


# ------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------


def run_command(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    commands = {c.name: c for c in CORE_COMMANDS}
    if argv[0] not in commands:
        from meshagent.hooks.manager import PluginManager
        for plugin, command in PluginManager(None).hooks.commands():
            if command.name in commands:
                raise UsageError(f"command {command.name!r} of plugin {plugin!r} is taken")
            commands[command.name] = command
    if argv[0] not in commands:
        raise UsageError(f"unknown command {argv[0]!r}; commands: {', '.join(sorted(commands))}")
    command = commands[argv[0]]
    parser = argparse.ArgumentParser(prog=f"meshagent {command.name}", description=command.help)
    parser.add_argument("--socket-path", type=Path,
                        default=Path(environ.get("MESHAGENT_SOCKET_PATH", DEFAULT_SOCKET)),
                        help="agent API socket [env MESHAGENT_SOCKET_PATH]")
    command.add_arguments(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:
        return int(exc.code or 0)
    return command.run(args)


def _add_socket_path(parser: argparse.ArgumentParser) -> None:
    """A sub-command's own --socket-path (argparse reads options after the action there)."""
    parser.add_argument("--socket-path", type=Path, default=argparse.SUPPRESS,
                        help="agent API socket [env MESHAGENT_SOCKET_PATH]")


def _status(args: argparse.Namespace) -> int:
    return print_status(AgentClient(args.socket_path), args.output, args.verbose)


def _plugins_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugins", default=None,
                        help="show what this allow-list would load and block, instead of"
                             " asking the running agent")
    add_output(parser)


def _plugins(args: argparse.Namespace) -> int:
    from meshagent.hooks.manager import PluginManager
    source = "installed plugins (no agent running)"
    if args.plugins is not None:
        rows = to_jsonable(PluginManager([p for p in args.plugins.split(",") if p]).infos())
        source = f"plugins for --plugins={args.plugins}"
    else:
        try:
            rows = AgentClient(args.socket_path).get("/plugins")
            source = f"plugins of the agent at {args.socket_path}"
        except AgentNotRunning:
            rows = to_jsonable(PluginManager(None).infos())
    if args.output == "json":
        print_json(rows)
        return 0
    print(f"# {source}")
    table = [("NAME", "STATUS", "ORIGIN", "PROVIDES", "HOOKS")]
    for row in rows:
        provides = "; ".join(f"{slot}: {','.join(names)}" for slot, names in row["provides"].items())
        hooks = ",".join(h.removeprefix("meshagent_") for h in row["hooks"])
        table.append((row["name"], row["status"], row["origin"], provides or "-", hooks or "-"))
    print(format_table(table))
    for row in rows:
        if row.get("unknown_hooks"):
            print(f"# plugin {row['name']!r} implements unknown hooks"
                  f" {', '.join(row['unknown_hooks'])}: an agent refuses to start with it")
    return 0


def _config_args(parser: argparse.ArgumentParser) -> None:
    add_output(parser)


def _config(args: argparse.Namespace) -> int:
    body = AgentClient(args.socket_path).get("/config")
    if args.output == "json":
        print_json(body)
        return 0
    table = [("OPTION", "VALUE", "SOURCE")]
    for name, entry in body.items():
        value = entry["value"]
        shown = ",".join(value) if isinstance(value, list) else str(value)
        table.append((name, shown, entry["source"]))
    print(format_table(table))
    return 0


def _list_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list",))
    add_output(parser)


def _print_rows(args: argparse.Namespace, path: str, header: tuple[str, ...], row) -> int:
    """GET ``path`` and print it as JSON or as a table of ``row(item)``."""
    items = AgentClient(args.socket_path).get(path)
    if args.output == "json":
        print_json(items)
    else:
        print(format_table([header] + [row(item) for item in items]))
    return 0


def _node_list(args: argparse.Namespace) -> int:
    def row(node):
        v4 = [c for c in node["pod_cidrs"] if ":" not in c]
        v6 = [c for c in node["pod_cidrs"] if ":" in c]
        return (f"{node['cluster']}/{node['name']}", node["ipv4"] or "", v4[0] if v4 else "",
                node.get("ipv6") or "", v6[0] if v6 else "")
    return _print_rows(args, "/nodes", ("Name", "IPv4 Address", "Endpoint CIDR",
                                        "IPv6 Address", "Endpoint CIDR"), row)


def _identity_list(args: argparse.Namespace) -> int:
    return _print_rows(args, "/identities", ("ID", "CLUSTER", "LABELS"),
                       lambda i: (str(i["id"]), i["cluster"], " ".join(i["labels"])))


def _ip_list(args: argparse.Namespace) -> int:
    def row(entry):
        pod = f"{entry['namespace']}/{entry['pod_name']}" if entry["pod_name"] else ""
        return (entry["prefix"], str(entry["identity"]), entry["cluster"],
                entry["host_ip"] or "", pod)
    return _print_rows(args, "/ipcache", ("IP", "IDENTITY", "CLUSTER", "HOST", "POD"), row)


def _endpoint_args(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="wire a network namespace up as an endpoint")
    create.add_argument("--netns", required=True, help="netns name (ip netns) or path")
    create.add_argument("--namespace", required=True, help="the pod's Kubernetes namespace")
    create.add_argument("--labels", default="", help="app=x,role=y (source k8s: unless given)")
    create.add_argument("--ifname", default="eth0", help="interface name inside the netns")
    create.add_argument("--pod-name", default="")
    create.add_argument("--container-id", default="")
    actions.add_parser("list", help="list endpoints")
    for name in ("get", "delete"):
        sub = actions.add_parser(name, help=f"{name} one endpoint")
        sub.add_argument("id", type=int)
    config = actions.add_parser(
        "config", help="view or change an endpoint's options, as cilium endpoint config:"
                       " ID lists them, ID PolicyAuditMode=Enabled|Disabled|Default sets one"
                       " (Default: follow the agent's --policy-audit-mode)")
    config.add_argument("id", type=int, nargs="?")
    config.add_argument("settings", nargs="*", metavar="OPTION=VALUE")
    config.add_argument("--list-options", action="store_true", help="list available options")
    for sub in actions.choices.values():
        add_output(sub)
        _add_socket_path(sub)


def _endpoint(args: argparse.Namespace) -> int:
    client = AgentClient(args.socket_path)
    if args.action == "list":
        items = client.get("/endpoints")
        if args.output == "json":
            print_json(items)
        else:
            print(format_table([*ENDPOINT_HEADER] + [_endpoint_row(e) for e in items]))
        return 0
    if args.action == "config":
        return _endpoint_config(client, args)
    if args.action == "create":
        body = {"netns": args.netns, "namespace": args.namespace, "labels": args.labels,
                "pod_ifname": args.ifname, "pod_name": args.pod_name,
                "container_id": args.container_id}
        endpoint = client.call("POST", "/endpoints", json=body, ok=(201,))
    elif args.action == "get":
        endpoint = client.get(f"/endpoints/{args.id}")
    else:
        endpoint = client.call("DELETE", f"/endpoints/{args.id}")
    if args.output == "json":
        print_json(endpoint)
    else:
        print(format_table([*ENDPOINT_HEADER, _endpoint_row(endpoint)]))
    return 0


def _endpoint_config(client: AgentClient, args: argparse.Namespace) -> int:
    """``cilium endpoint config``'s behaviour: the options (``%-24s %s`` lines) or a change."""
    if args.list_options:
        from meshagent.endpoint.options import OPTIONS
        for name, description in OPTIONS.items():
            print(f"{name:<24} {description}")
        return 0
    if args.id is None:
        raise UsageError("meshagent endpoint config: give an endpoint ID (or --list-options)")
    if not args.settings:
        config = client.get(f"/endpoints/{args.id}/config")
        if args.output == "json":
            print_json(config)
        else:
            for name, value in sorted(config["options"].items()):
                print(f"{name:<24} {value}")
        return 0
    options = {}
    for setting in args.settings:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise UsageError(f"cannot parse option {setting!r}: expected OPTION=VALUE, e.g."
                             " PolicyAuditMode=Enabled")
        options[name] = value
    config = client.call("PATCH", f"/endpoints/{args.id}/config", json={"options": options})
    if args.output == "json":
        print_json(config)
    else:
        print(f"Endpoint {args.id} configuration updated successfully")
    return 0


# two header lines, as cilium endpoint list's
ENDPOINT_HEADER = (("ENDPOINT", "POLICY (ingress)", "POLICY (egress)", "IPV4", "IPV6",
                    "IDENTITY", "POLICY REV", "INTERFACE", "NAMESPACE", "LABELS"),
                   ("", "ENFORCEMENT", "ENFORCEMENT", "", "", "", "", "", "", ""))

#: Cilium's endpoint model's policy-enabled values -> the (ingress, egress) columns, as
#: cilium endpoint list prints them (cilium-dbg/cmd/endpoint_list.go)
POLICY_COLUMNS = {
    "none": ("Disabled", "Disabled"), "both": ("Enabled", "Enabled"),
    "ingress": ("Enabled", "Disabled"), "egress": ("Disabled", "Enabled"),
    "audit-both": ("Disabled (Audit)", "Disabled (Audit)"),
    "audit-ingress": ("Disabled (Audit)", "Disabled"),
    "audit-egress": ("Disabled", "Disabled (Audit)"),
}


def _endpoint_row(e: dict) -> tuple[str, ...]:
    user = [label for label in e["labels"] if "io.kubernetes.pod.namespace" not in label
            and "io.cilium.k8s.policy.cluster" not in label]
    ingress, egress = POLICY_COLUMNS.get(e.get("policy_enabled"), ("Unknown", "Unknown"))
    return (str(e["id"]), ingress, egress, e["ipv4"], e.get("ipv6") or "-", str(e["identity"]),
            str(e.get("policy_revision", "-")), e["ifname"], e["namespace"], " ".join(user))


def _post_files(client: AgentClient, path: str, files: list[Path], field: str,
                verb: str) -> int:
    """Send each file's text to the agent (which validates it) and print what it took."""
    for file in files:
        try:
            text = file.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read {file}: {exc.strerror}") from None
        done = client.call("POST", path, json={"text": text, "source": str(file)}, ok=(201,))
        for name in done[field]:
            print(f"{verb} {name}")
    return 0


def _policy_args(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    imp = actions.add_parser("import", help="validate and import policy files (YAML or JSON);"
                             " prints the policy revision it made")
    imp.add_argument("files", nargs="+", type=Path)
    imp.add_argument("--wait", action="store_true",
                     help="return once every local endpoint enforces it (policy wait)")
    wait = actions.add_parser("wait", help="wait until every local endpoint enforces a policy"
                              " revision (as printed by import)")
    wait.add_argument("revision", type=int)
    for sub in (imp, wait):
        sub.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    delete = actions.add_parser("delete", help="delete a policy by name")
    delete.add_argument("name")
    delete.add_argument("--namespace", default="default")
    delete.add_argument("--clusterwide", action="store_true",
                        help="a CiliumClusterwideNetworkPolicy")
    get = actions.add_parser("get", help="the policies in force")
    get.add_argument("-o", "--output", choices=("yaml", "json", "rules"), default="yaml",
                     help="yaml: the documents; json: documents and rules; rules: each rule"
                          " with its labels, as cilium policy get prints them")
    get.add_argument("labels", nargs="*", metavar="LABEL",
                     help="[source:]key[=value]: only the rules carrying every one (-o rules)")
    tr = actions.add_parser("trace", help="explain the verdict for a source reaching an endpoint"
                                          " (or an endpoint reaching a destination)")
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument("--src-labels", help="app=x,... (k8s: prefix added where missing)")
    source.add_argument("--src-identity", type=int)
    source.add_argument("--src-ip")
    source.add_argument("--src-endpoint", type=int, help="a local endpoint: trace its egress")
    destination = tr.add_mutually_exclusive_group(required=True)
    destination.add_argument("--dst-endpoint", type=int)
    destination.add_argument("--dst-labels", help="with --src-endpoint: app=x,...")
    destination.add_argument("--dst-identity", type=int, help="with --src-endpoint")
    destination.add_argument("--dst-ip", help="with --src-endpoint")
    tr.add_argument("--dport", required=True, help="PORT or PORT/PROTO (default TCP)")
    tr.add_argument("-o", "--output", choices=("text", "json"), default="text")
    for sub in actions.choices.values():
        _add_socket_path(sub)


def _policy_wait(client: AgentClient, revision: int, timeout: float) -> int:
    """Until every local endpoint enforces ``revision``; exit 1 naming those behind."""
    client.call("GET", "/policy/wait", params={"revision": revision, "timeout": timeout},
                timeout=timeout + 10)
    print(f"revision {revision} enforced on every local endpoint")
    return 0


def _rule_has_labels(rule: dict, wanted: list[str]) -> bool:
    """Whether ``rule`` carries every label of ``wanted`` (``[source:]key[=value]``; without a
    source, any source's)."""
    have = {(label["source"], label["key"], label.get("value", ""))
            for label in rule.get("labels", [])}
    for text in wanted:
        source, sep, rest = text.partition(":")
        if not sep:
            source, rest = "", text
        key, _, value = rest.partition("=")
        if not any(k == key and v == value and (not source or s == source)
                   for s, k, v in have):
            return False
    return True


def _policy(args: argparse.Namespace) -> int:
    client = AgentClient(args.socket_path)
    if args.action == "import":
        revision = 0
        for file in args.files:
            try:
                text = file.read_text()
            except OSError as exc:
                raise UsageError(f"cannot read {file}: {exc.strerror}") from None
            done = client.call("POST", "/policy", json={"text": text, "source": str(file)},
                               ok=(201,))
            for name in done["imported"]:
                print(f"imported {name}")
            for warning in done.get("warnings", ()):
                print(f"warning: {warning}", file=sys.stderr)
            revision = max(revision, done["revision"])
        print(f"revision {revision}")
        return _policy_wait(client, revision, args.timeout) if args.wait else 0
    if args.action == "wait":
        return _policy_wait(client, args.revision, args.timeout)
    if args.action == "delete":
        kind = "CiliumClusterwideNetworkPolicy" if args.clusterwide else "CiliumNetworkPolicy"
        namespace = "-" if args.clusterwide else args.namespace
        client.call("DELETE", f"/policy/{kind}/{namespace}/{args.name}")
        print(f"deleted {kind} {args.name}")
        return 0
    if args.action == "get":
        body = client.get("/policy")
        if args.output == "rules":
            # cilium-dbg/cmd/policy_get.go: the agent's indented JSON, then the revision
            rules = [r for r in body["rules"] if _rule_has_labels(r, args.labels)]
            print(f"{json.dumps(rules, indent=2)}\nRevision: {body['revision']}")
            return 0
        if args.labels:
            raise UsageError("meshagent policy get: LABEL filters need -o rules")
        if args.output == "json":
            print_json(body)
        else:
            import yaml
            print(f"# revision {body['revision']}")
            print(yaml.safe_dump_all(body["policies"], sort_keys=False) if body["policies"]
                  else "# no policies", end="")
        return 0
    port, _, proto = args.dport.partition("/")
    if not port.isdigit():
        raise UsageError(f"invalid --dport={args.dport!r}: expected PORT or PORT/PROTO")
    egress = args.src_endpoint is not None
    if egress == (args.dst_endpoint is not None):
        raise UsageError("give --dst-endpoint with a source (ingress), or --src-endpoint with"
                         " a destination (egress)")
    local, side = ("src", "dst") if egress else ("dst", "src")
    body = {f"{local}_endpoint": getattr(args, f"{local}_endpoint"), "port": int(port),
            "protocol": proto or "TCP"}
    labels, identity = getattr(args, f"{side}_labels"), getattr(args, f"{side}_identity")
    if labels is not None:
        body[f"{side}_labels"] = [label if ":" in label.split("=")[0] else f"k8s:{label}"
                                  for label in labels.split(",") if label]
    elif identity is not None:
        body[f"{side}_identity"] = identity
    else:
        body[f"{side}_ip"] = getattr(args, f"{side}_ip")
    result = client.call("POST", "/policy/trace", json=body)
    if args.output == "json":
        print_json(result)
        return 0
    direction = result.get("direction", "ingress")
    where = f"port {result['port']}/{result['protocol']} ({direction})"
    print(f"source:      {_trace_side(result['source'])}")
    print(f"destination: {_trace_side(result['destination'])}, {where}")
    print(f"policies:    {', '.join(result['selecting_policies']) or 'none selects it'}")
    for line in result["matched"]:
        print(f"matched:     {line}")
    print(f"verdict:     {result['verdict'].upper()}: {result['reason']}")
    if result.get("policy_audit"):
        endpoint = result["source" if direction == "egress" else "destination"]["endpoint"]
        print(f"audit:       endpoint {endpoint} is in policy audit mode: "
              + ("this traffic passes anyway, reported with verdict AUDIT"
                 if result["verdict"] == "deny"
                 else "traffic the policy denies would pass, reported with verdict AUDIT"))
    return 0 if result["verdict"] in ("allow", "redirect") else 1


def _trace_side(side: dict) -> str:
    """A trace's local endpoint, or its peer (identity, cluster, labels)."""
    if "endpoint" in side:
        return f"endpoint {side['endpoint']}"
    return (f"identity {side['identity']} from cluster {side['cluster']}:"
            f" {' '.join(side['labels'])}")


def _service_args(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    apply = actions.add_parser("apply", help="Kubernetes Service YAML with its Endpoints")
    apply.add_argument("files", nargs="+", type=Path)
    delete = actions.add_parser("delete", help="delete a service")
    delete.add_argument("name")
    delete.add_argument("--namespace", default="default")
    listing = actions.add_parser("list", help="services with their frontends and backends")
    add_output(listing)
    for sub in actions.choices.values():
        _add_socket_path(sub)


def _service(args: argparse.Namespace) -> int:
    client = AgentClient(args.socket_path)
    if args.action == "apply":
        return _post_files(client, "/services", args.files, "applied", "applied service")
    if args.action == "delete":
        client.call("DELETE", f"/services/{args.namespace}/{args.name}")
        print(f"deleted service {args.namespace}/{args.name}")
        return 0

    def row(m):
        s = m["service"]
        frontends = ", ".join(f"{f['ip']}:{f['port']}/{f['protocol']}" for f in s["frontends"])
        backends = ", ".join(f"{b['ip']}:{b['port']} ({b['cluster']})" for b in m["backends"])
        kind = ("global" + ("" if s["shared"] else ", not shared")) if s["global_"] else "local"
        return (f"{s['namespace']}/{s['name']}", kind, s["affinity"], frontends, backends or "-")
    return _print_rows(args, "/services", ("SERVICE", "TYPE", "AFFINITY", "FRONTENDS",
                                           "BACKENDS"), row)


def _lab_module():
    """The lab is a development tool (package meshagent-dev, installed by ``make setup``), not
    part of the product: imported on use, with a clear error where it is not installed."""
    try:
        from meshagent_dev import lab
    except ImportError as exc:
        raise UsageError("'meshagent lab' needs the development tools: pip install"
                         f" ./devtools (make setup does) ({exc})") from None
    return lab


def _lab_args(parser: argparse.ArgumentParser) -> None:
    _lab_module().add_arguments(parser)


def _lab(args: argparse.Namespace) -> int:
    return _lab_module().run(args)


def _fqdn_args(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True)
    cache = kinds.add_parser("cache", help="the names the DNS proxy saw, per endpoint")
    actions = cache.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list the cache (cilium fqdn cache list)")
    listing.add_argument("-e", "--endpoint", default="",
                         help="List cache entries for a specific endpoint id")
    listing.add_argument("-p", "--matchpattern", default="",
                         help="List cache entries with FQDN that match matchpattern")
    listing.add_argument("-s", "--source", default="", choices=("", "lookup", "connection"),
                         help="List cache entries from a specific source (lookup, connection)")
    listing.add_argument("-o", "--output", choices=("text", "json"), default="text")
    clean = actions.add_parser("clean", help="forget names, and what they allowed")
    clean.add_argument("-f", "--force", action="store_true", help="Skip confirmation")
    clean.add_argument("-p", "--matchpattern", default="",
                       help="Delete cache entries with FQDNs that match matchpattern")
    for sub in actions.choices.values():
        _add_socket_path(sub)


def _fqdn(args: argparse.Namespace) -> int:
    """Cilium's ``fqdn cache list`` and ``fqdn cache clean``, their columns and messages."""
    client = AgentClient(args.socket_path)
    if args.action == "list":
        return _fqdn_list(client, args.endpoint, args.matchpattern, args.source, args.output)
    if not args.force:
        print("Following cache entries are going to be deleted:")
        _fqdn_list(client, "", args.matchpattern, "", "text")
        print("The command is non-revertible, do you want to continue [y/N]?")
        if sys.stdin.readline().strip() != "y":
            return 0
    client.call("DELETE", "/fqdn/cache", params={"matchpattern": args.matchpattern})
    print("FQDN proxy cache cleared")
    return 0


def _fqdn_list(client: AgentClient, endpoint: str, pattern: str, source: str,
               output: str) -> int:
    params = {key: value for key, value in (("endpoint", endpoint), ("matchpattern", pattern),
                                            ("source", source)) if value}
    rows = client.get("/fqdn/cache", params=params)
    if output == "json":
        print_json(rows)
        return 0
    table = [("Endpoint", "Source", "FQDN", "TTL", "ExpirationTime", "IPs")]
    table += [(str(r["endpoint-id"]), r["source"], r["fqdn"], str(r["ttl"]),
               r["expiration-time"], ",".join(r["ips"])) for r in rows]
    # Go's tabwriter as Cilium sets it up: minimum width 5, padding 3
    widths = [max(5, max(len(row[i]) for row in table)) + 3 for i in range(len(table[0]))]
    for row in table:
        print("".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _monitor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", choices=("drop", "l7"), default=None,
                        help="only events of this type (datapaths send drops, the DNS proxy"
                             " l7 records)")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    parser.add_argument("--count", type=int, default=0, help="stop after N events")


def _monitor(args: argparse.Namespace) -> int:
    """Stream the running datapath's events (whichever datapath it is)."""
    import asyncio

    import aiohttp

    from meshagent.client import API_PREFIX
    from meshagent.datapath.drops import format_drop
    from meshagent.fqdn.record import format_l7

    async def stream() -> int:
        connector = aiohttp.UnixConnector(path=str(args.socket_path))
        seen = 0
        try:
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=None)) as s:
                async with s.get(f"http://meshagent{API_PREFIX}/monitor") as response:
                    if response.status == 404:
                        raise UsageError("the running agent has no datapath: nothing to"
                                         " monitor")
                    async for line in response.content:
                        event = json.loads(line)
                        if args.type and event.get("type") != args.type:
                            continue
                        text = format_l7(event) if event.get("type") == "l7" else \
                            format_drop(event)
                        print(json.dumps(event) if args.output == "json" else text, flush=True)
                        seen += 1
                        if args.count and seen >= args.count:
                            return 0
        except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
            raise AgentNotRunning(f"no agent is running: cannot connect to {args.socket_path}"
                                  f" ({exc})") from None
        return 0
    try:
        return asyncio.run(stream())
    except KeyboardInterrupt:
        return 0


def _observe_args(parser: argparse.ArgumentParser) -> None:
    from meshagent.observe.cli import add_arguments
    add_arguments(parser)


def _observe(args: argparse.Namespace) -> int:
    from meshagent.observe.cli import run
    return run(args)


CORE_COMMANDS = (
    Command("observe", "observe flows as hubble observe does (Hubble's API: this agent, a"
            " server, or --mesh for every node of every cluster)", _observe_args, _observe),
    Command("monitor", "stream datapath events (drops) and DNS proxy records from the running"
            " agent", _monitor_args,
            _monitor),
    Command("status", "show the agent's health, section by section", status_args, _status),
    Command("plugins", "list plugins: name, status, origin, slots filled, hooks",
            _plugins_args, _plugins),
    Command("config", "show every option's value and where it came from", _config_args, _config),
    Command("node", "list the nodes of every cluster in the mesh", _list_args, _node_list),
    Command("identity", "list the security identities known from every cluster", _list_args,
            _identity_list),
    Command("ip", "list IP to identity mappings (the ipcache) of every cluster", _list_args,
            _ip_list),
    Command("endpoint", "create, list, get and delete local endpoints (pods)", _endpoint_args,
            _endpoint),
    Command("policy", "import, delete, get and trace network policies", _policy_args, _policy),
    Command("fqdn", "the DNS proxy's name cache: list and clean (cilium fqdn cache)",
            _fqdn_args, _fqdn),
    Command("service", "apply, delete and list services (global ones span clusters)",
            _service_args, _service),
    Command("lab", "the seed's two clusters on this machine, in network namespaces",
            _lab_args, _lab),
)
