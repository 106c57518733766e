"""All benchmarks, one run, one report: ``make bench`` (or ``make bench BENCH_ARGS=--quick``).

Runs the ClusterMesh sync, propagation, identity allocation, policy resolution, datapath and
KVStoreMesh benchmarks side by side, writes their JSON to bench/results/, and writes docs/performance.md
(tables, PNG plots, the command behind each figure, the machine). Needs root (BPF, namespaces).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS = ROOT / "docs"
PY = sys.executable


def step(name: str, script: str, *args: str) -> dict:
    out = RESULTS / f"{name}.json"
    print(f"\n=== {name}: {script} {' '.join(args)}", flush=True)
    started = time.monotonic()
    subprocess.run([PY, str(HERE / script), *args, "--json", str(out)], check=True, cwd=HERE)
    print(f"=== {name} took {time.monotonic() - started:.0f}s", flush=True)
    return json.loads(out.read_text())


def plots(results: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    runs = [r for r in results["sync"]["runs"] if r["datapath"]]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = [r["entries"] for r in runs]
    ax[0].plot(xs, [r["seconds_to_ready"] for r in runs], "o-")
    ax[0].axhline(5, color="grey", linestyle="--", label="goal 5 s")
    ax[0].set(xscale="log", xlabel="remote ipcache entries", ylabel="seconds to ready",
              title="ClusterMesh sync")
    ax[0].legend()
    ax[1].plot(xs, [r["peak_rss_mib"] for r in runs], "o-", color="tab:orange")
    ax[1].axhline(200, color="grey", linestyle="--", label="goal 200 MiB")
    ax[1].set(xscale="log", xlabel="remote ipcache entries", ylabel="peak RSS (MiB)",
              title="agent memory")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(DOCS / "perf-sync.png", dpi=90)
    made.append("perf-sync.png")
    plot_datapath(results["datapath"])
    made.append("perf-datapath.png")
    kvm = results["kvstoremesh"]
    panels = [("connections from\nother clusters", [max(x["from_other_clusters"] for x in
                                                      kvm[m]["connections_per_etcd"])
                                                  for m in MODES]),
              ("connections\nin all", [max(x["total"] for x in kvm[m]["connections_per_etcd"])
                                       for m in MODES]),
              ("watchers", [max(kvm[m]["watchers_per_etcd"]) for m in MODES]),
              ("CPU s of all etcds\nuntil synced", [sum(kvm[m]["etcd_cpu_seconds_during_sync"])
                                             for m in MODES]),
              ("s to all synced\nafter a restart",
               [kvm[m]["seconds_to_all_synced_after_restart"] for m in MODES])]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 2.8))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(MODES, values, color=["tab:red", "tab:green"])
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"KVStoreMesh: {kvm['clusters']} clusters × {kvm['agents_per_cluster']} agents,"
                 " (per etcd: the most loaded)", fontsize=10)
    fig.tight_layout()
    fig.savefig(DOCS / "perf-kvstoremesh.png", dpi=90)
    made.append("perf-kvstoremesh.png")
    return made


MODES = ("direct", "cached")


def report(results: dict, args) -> str:
    sync, prop, ids, pol, dp, kvm = (results[k] for k in NAMES)
    full = sync["runs"][2]
    nodp = sync["runs"][3]
    yes = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    lines = [
        "# Performance", "",
        f"Measured by `make bench{' BENCH_ARGS=--quick' if args.quick else ''}`"
        f" (bench/run.py) on {sync['machine']}, {time.strftime('%Y-%m-%d')}.",
        "Every figure is measured; comparisons are side by side in one run and stated as"
        " ratios. Each section names the command that reproduces it alone.", "",
        "## Summary", "",
        "| goal | measured | |", "|---|---|---|",
        f"| ClusterMesh sync of {full['entries']:,} entries ≤ 5 s |"
        f" {full['seconds_to_ready']} s | {yes(sync['goal_seconds_le_5'])} |",
        f"| … with peak RSS ≤ 200 MiB | {full['peak_rss_mib']} MiB |"
        f" {yes(sync['goal_rss_le_200mib'])} |",
        f"| propagation p99 ≤ 100 ms at {prop['rate_per_s']}/s | {prop['p99_ms']} ms |"
        f" {yes(prop['goal_p99_le_100ms'])} |",
        *datapath_summary(dp, yes),
        f"| incremental policy update ≤ 10 ms | {pol['incremental_add_ms_median']} ms |"
        f" {yes(pol['goal_incremental_le_10ms'])} |",
        f"| identity allocation ≥ 1,000 new identities/s, {ids['agents']} agents racing |"
        f" {ids['new_identities_per_s']}/s (median of {ids['runs']}) |"
        f" {yes(ids['new_identities_per_s'] >= 1000 and ids['all_agents_agree_and_ids_distinct'])}"
        " |",
        f"| KVStoreMesh: connections to an etcd from other clusters, direct / cached |"
        f" {kvm['direct_over_cached']['connections_from_other_clusters']}× fewer cached |"
        " (measured) |", "",
        "## ClusterMesh sync", "",
        "`.venv/bin/python bench/clustermesh_sync.py --entries "
        f"{full['entries']}` — a remote etcd holding N ipcache entries, N/10 identities, N/100"
        " nodes and N/100 services; time from agent start until the remote is ready and every"
        " entry is in the BPF ipcache; the agent's peak RSS.", "",
        "| entries (keys) | seconds to ready | in BPF ipcache | peak RSS |", "|---|---|---|---|",
    ]
    for r in sync["runs"]:
        label = f"{r['entries']:,} ({r['keys']:,})" + ("" if r["datapath"] else
                                                       ", no datapath")
        lines.append(f"| {label} | {r['seconds_to_ready']} | {r['ipcache_in_bpf'] or '-'} |"
                     f" {r['peak_rss_mib']} MiB |")
    lines += ["", "![sync](perf-sync.png)", "",
              f"The no-datapath row is the control: it runs no datapath code at all, so when it"
              f" moves between two runs the machine moved. This shared 2-core machine varies by"
              f" 2–3× between days (the control took 2.67 s on 2026-11-26 and"
              f" {nodp['seconds_to_ready']} s in this run); compare only figures of one run, or"
              f" run the previous commit side by side from a git worktree with its own venv.", "",
              f"What bounds memory: the run without the datapath peaks at {nodp['peak_rss_mib']}"
              " MiB, so the datapath adds little. The 100,000-entry run peaked at about 375 MiB"
              " before issue 20 (side by side with the previous commit on one machine: 376 →"
              " 158 MiB, and 14.3 → 7.8 s to ready, the time mostly from the eBPF status no"
              " longer counting every map's entries on each status call). Three changes did the"
              " memory. The agent process no longer loads libbcc: it calls bcc's syscall wrappers"
              " in `libbcc_bpf.so` (maps, pins, perf readers), and only the short-lived compile"
              " child loads libbcc, whose LLVM and clang were some 55 MiB of the agent's resident"
              " pages (an idle agent with the eBPF datapath: 127 → 67 MiB). ipcache rows are"
              " packed: an `IPCacheEntry` holds its prefix as 5 (or 17) bytes, which is also its"
              " key in the `IPCache` and the sync's table key, and its host address as bytes"
              " shared by a node's entries; `prefix` and `host_ip` unpack on use (an"
              " `ipaddress.IPv4Network` of a /32 cost some 400 bytes). And nothing ipcache-sized"
              " is built on the way: listings are read in pages of 10,000 keys at one revision"
              " (`KVStore.list_pages`), the eBPF reconcile walks the map's keys instead of a list"
              " of its items, and the datapath feed no longer queues the changes heard before its"
              " first full state. `bench/memory_profile.py` (tracemalloc, no datapath, 100,000"
              " entries): 162 → 94 MiB traced once ready. What is left, about 0.9 KiB of RSS per"
              " entry with its share of identities and nodes: the kvstore key string and its"
              " slots in the sync's dicts, the entry and its `IPCache` slot, and the policy"
              " selector's label indexes of the 10,000 identities (~15 MiB); an idle agent is the"
              " 67 MiB above.", "",
              *million_report(results.get("sync_1m")),
              "## Propagation", "",
              f"`.venv/bin/python bench/propagation.py --rate {prop['rate_per_s']} --seconds"
              f" {prop['seconds']:g}` — remote ipcache puts at a steady rate (a separate writer"
              " process); latency from each put to the local BPF map update.", "",
              "| written | applied | p50 | p99 | max | kept up |", "|---|---|---|---|---|---|",
              f"| {prop['written']:,} | {prop['applied']:,} | {prop['p50_ms']} ms |"
              f" {prop['p99_ms']} ms | {prop['max_ms']} ms | {prop['kept_up']} |", "",
              "## Identity allocation", "",
              f"`.venv/bin/python bench/identity.py --agents {ids['agents']} --labels"
              f" {ids['label_sets']} --runs {ids['runs']}` — every agent (its own process)"
              " allocates every label set at once (the race the allocator must win), against"
              f" one etcd; the median of {ids['runs']} runs.", "",
              "| allocations | seconds | allocations/s | new identities/s (each run) | p50 | p99 |"
              " CPU: agents / etcd | agreed, distinct, one id key each |",
              "|---|---|---|---|---|---|---|---|",
              f"| {ids['allocations']:,} | {ids['seconds']} | {ids['allocations_per_s']} |"
              f" {ids['new_identities_per_s']}"
              f" ({', '.join(map(str, ids['new_identities_per_s_each_run']))}) |"
              f" {ids['p50_ms']} ms | {ids['p99_ms']} ms |"
              f" {ids['agents_cpu_s']} / {ids['etcd_cpu_s']} s |"
              f" {ids['all_agents_agree_and_ids_distinct'] and ids['one_id_key_per_label_set']} |",
              "",
              "The latencies are those of a burst: all allocations are issued at the same"
              " moment (each agent in its own process), so most of them wait for the CPU: the"
              " agents and etcd share two cores, and each RPC costs both some.", "",
              *kvstoremesh_report(kvm),
              "## Policy resolution", "",
              f"`.venv/bin/python bench/policy.py --identities {pol['identities']} --policies"
              f" {pol['policies']} --endpoints {pol['endpoints']}`", "",
              "| map entries | full resolution | one incremental identity add (median / max) |"
              " full / incremental |", "|---|---|---|---|",
              f"| {pol['map_entries']:,} | {pol['full_resolution_s']} s |"
              f" {pol['incremental_add_ms_median']} / {pol['incremental_add_ms_max']} ms |"
              f" {pol['full_over_incremental']:,} |", "",
              "### Policy map size with port ranges", "",
              f"Same command, second part: {pol['ranges']['policies']:,} policies whose rules"
              " allow and deny port ranges 1 to 30,000 ports wide over TCP, UDP or any"
              f" protocol ({pol['ranges']['resolver_keys']:,} resolver keys on"
              f" {pol['endpoints']} endpoints). What the ebpf plugin writes — port prefixes,"
              " deny folded into every prefix it covers — against one entry per port:", "",
              "| policy map entries (prefixes) | one entry per port | ratio |"
              " most prefixes for one key |", "|---|---|---|---|",
              f"| {pol['ranges']['map_entries_prefixes']:,} |"
              f" {pol['ranges']['map_entries_one_per_port']:,} |"
              f" {pol['ranges']['per_port_over_prefixes']:,} |"
              f" {pol['ranges']['max_prefixes_per_key']} (≤ 30 per protocol; ANY is three"
              " protocols) |", ""]
    lines += datapath_report(dp)
    return "\n".join(lines)


def million_report(run: dict | None) -> list[str]:
    """The million-entry run: measured alone (it takes some ten minutes), when it was."""
    if run is None:
        return []
    r = run["runs"][0]
    return [f"A million entries (`.venv/bin/python bench/clustermesh_sync.py --entries"
            f" {r['entries']} --only`, run on its own: {r['keys']:,} keys, the BPF ipcache sized"
            f" for them): ready in {r['seconds_to_ready']} s, every entry in the BPF ipcache in"
            f" {r['seconds_to_all_in_bpf']} s, peak RSS {r['peak_rss_mib']} MiB. Past"
            " `--datapath-sync-timeout` (30 s) the datapath reconciles with what has arrived and"
            f" the rest streams in ({r['ipcache_in_bpf']:,} were in the map at ready).", ""]


DATAPATH_SETUPS = (("a_no_programs", "(a) no programs"), ("b_meshagent_ebpf", "(b) eBPF, flows"),
                   ("e_meshagent_ebpf_no_flows", "(e) eBPF, no flows"),
                   ("c_iptables", "(c) iptables"), ("d_meshagent_nftables", "(d) nftables"))


def plot_datapath(dp: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ratio = dp["ratio_to_a"]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    width = 0.27
    for i, (metric, label) in enumerate((("iperf3_gbit_s", "iperf3"),
                                         ("redis_ping_rps", "redis PING"),
                                         ("new_conn_per_s", "new connections/s"))):
        ax.bar([k + i * width for k in range(len(DATAPATH_SETUPS))],
               [ratio[key][metric] for key, _ in DATAPATH_SETUPS], width, label=label)
    ax.axhline(0.95, color="grey", linestyle="--", label="goal 0.95 (iperf3, PING)")
    ax.axhline(0.90, color="grey", linestyle=":", label="goal 0.90 (new connections)")
    ax.set_xticks([k + width for k in range(len(DATAPATH_SETUPS))],
                  [name.replace(", ", "\n") for _, name in DATAPATH_SETUPS], fontsize=8)
    top = max(1.4, *(ratio[key][m] + 0.05 for key, _ in DATAPATH_SETUPS for m in ratio[key]))
    ax.set(ylim=(0.3, top), ylabel="ratio to (a)", title="datapath overhead")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(DOCS / "perf-datapath.png", dpi=90)


def flows_shown(dp: dict) -> bool:
    """Whether (b) reported flows in the run: otherwise (b) and (e) ran alike, and the goal
    "with flows" was not measured."""
    return bool(dp["flows"]["b_meshagent_ebpf"]["hubble_flows_processed_total"])


def datapath_summary(dp: dict, yes) -> list[str]:
    b, b_over_c = dp["ratio_to_a"]["b_meshagent_ebpf"], dp["b_over_c"]
    conn = (yes(dp["goal_b_conn_ge_90pct"]) if flows_shown(dp) else
            "**not shown**: (b) reported no flows in this run")
    return [f"| datapath throughput and request rate ≥ 95% of no programs |"
            f" {b['iperf3_gbit_s']:.0%} / {b['redis_ping_rps']:.0%} |"
            f" {yes(dp['goal_b_ge_95pct'])} |",
            f"| … and at least the same policy in iptables | {b_over_c['iperf3_gbit_s']:.0%}"
            f" / {b_over_c['redis_ping_rps']:.0%} of iptables | {yes(dp['goal_b_ge_c'])} |",
            f"| new connections/s with flows ≥ 90% of no programs | {b['new_conn_per_s']:.0%}"
            f" | {conn} |"]


def flows_cost(dp: dict, per_connection: float, lost: float) -> str:
    """What bounds (b) with flows: its agent's CPU per event against a connection's cost."""
    cpu_us = dp["agent_cpu_ms_per_1000_conn"]["b_meshagent_ebpf"]  # ms per 1,000 = µs per one
    budget_us = dp["cores"] * 1e6 / dp["results"]["a_no_programs"]["new_conn_per_s"]
    return ("What bounds (b) with flows is its agent: it spent"
            f" {cpu_us:.0f} µs of CPU per new connection, about"
            f" {cpu_us / max(per_connection, 1):.1f} µs per event ({lost:.0%} of the events"
            f" lost), where (a) makes a whole connection in {budget_us:.0f} µs of the machine's"
            f" {dp['cores']} cores. Its parts, each measured on its own: the eBPF datapath's"
            " reader (records read from the perf rings' memory in batches, one struct unpack"
            " each: `bench/ebpf_events.py`) and the observer (each event stored as a small"
            " record, the Hubble flow built only when read: `bench/observe_events.py`); see"
            " docs/datapath.md and docs/observability.md. Every event is a Python object in"
            f" the agent's loop; for (b) to stay at 90% of (a), flows may cost about"
            f" {budget_us / 10:.0f} µs a connection, {budget_us / 10 / max(per_connection, 1):.1f}"
            " µs an event.")


def datapath_report(dp: dict) -> list[str]:
    ratio, spread = dp["ratio_to_a"], dp["ratio_to_a_min_max"]
    lines = ["## Datapath overhead", "",
             f"`.venv/bin/python bench/datapath.py --rounds {dp['rounds']} --seconds"
             f" {dp['seconds']} --requests {dp['requests']} --connections {dp['connections']}`"
             f" ({dp['wall_seconds']} s) — five nodes side by side, each with a client and a"
             " server pod: (a) no programs, (b) meshagent's eBPF datapath enforcing an allow"
             " policy with 10,000 extra ipcache and 1,000 extra policy entries, reporting flows"
             " (`--enable-hubble=true`, the default), (e) the same without flows"
             " (`--enable-hubble=false`: drops only), (c) the same policy as stateful iptables"
             " (1,001 rules), (d) meshagent's nftables datapath with the same policy and the same"
             " extra entries (`--enable-hubble=true`: flows where the datapath reports them)."
             " Every round takes three measurements, of the five"
             " nodes one after the other in a new shuffled order for each: iperf3 throughput,"
             " redis PINGs over 20 kept-alive connections"
             " (`redis-benchmark -t ping -c 20`), and new connections per second"
             " (`redis-benchmark -t ping_inline -c 20 -k 0`: each PING on a connection of its"
             " own — connect, PING, PONG, close by the client). Each round's connections go to a"
             " redis of their own on a port of its own, from client ports 1024–65535 with no"
             " TIME_WAIT reuse, so that no round meets another round's closed connections in a"
             " datapath's conntrack (the eBPF datapath keeps a closed TCP connection's entries"
             " 10 s, Cilium's CT_CLOSE_TIMEOUT, and a new SYN on the same addresses and ports"
             " starts a new connection). The ratios are medians of each"
             " round's own ratios to (a); the range beside the connection ratio is the lowest"
             " and highest round's. The agent's CPU time is read from /proc around each"
             " connection measurement, to one clock tick"
             f" ({dp['agent_cpu_resolution_ms_per_1000_conn']} ms per 1,000 connections).", "",
             "| scenario | iperf3 | ratio | redis PING | ratio | new connections | ratio (range) |"
             " agent CPU per 1,000 connections |", "|---|---|---|---|---|---|---|---|"]
    for key, name in DATAPATH_SETUPS:
        r, q, lo_hi = dp["results"][key], ratio[key], spread[key]["new_conn_per_s"]
        lines.append(f"| {name} | {r['iperf3_gbit_s']:.2f} Gbit/s | {q['iperf3_gbit_s']} |"
                     f" {int(r['redis_ping_rps']):,}/s | {q['redis_ping_rps']} |"
                     f" {int(r['new_conn_per_s']):,}/s | {q['new_conn_per_s']}"
                     f"{'' if key == 'a_no_programs' else f' ({lo_hi[0]}–{lo_hi[1]})'} |"
                     f" {dp['agent_cpu_ms_per_1000_conn'][key]} ms |")
    flows = {key: dp["flows"][key] for key in ("b_meshagent_ebpf", "d_meshagent_nftables")}
    b_over_e = dp["b_over_e"]
    if flows_shown(dp):
        connections = dp["rounds"] * dp["connections"]

        def events(f: dict) -> int:
            return (f["hubble_flows_processed_total"] or 0) + (f["hubble_lost_events_total"] or 0)
        counted = [f"({key[0]}) {f['hubble_flows_processed_total'] or 0:,} flows and"
                   f" {f['hubble_lost_events_total'] or 0:,} events lost,"
                   f" {events(f) / connections:.1f} events per new connection"
                   for key, f in dp["flows"].items() if key[0] in "bde"]
        b = dp["flows"]["b_meshagent_ebpf"]
        lost = (b["hubble_lost_events_total"] or 0) / events(b)
        shown = (f"Flows processed by the agents' observers over the run: {'; '.join(counted)}"
                 " (all of the run's events, iperf3's and the PINGs' included, over its new"
                 " connections; (e) reports drops only). What reporting them costs: (b) over (e),"
                 f" {b_over_e['new_conn_per_s']:.0%} of the connection rate,"
                 f" {b_over_e['redis_ping_rps']:.0%} of the PING rate and"
                 f" {b_over_e['iperf3_gbit_s']:.0%} of the throughput, and the agent CPU column.")
        shown += "\n\n" + flows_cost(dp, events(b) / connections, lost)
    else:
        silent = " and ".join(f"({key[0]})" for key, f in flows.items()
                              if not f["hubble_flows_processed_total"])
        shown = (f"Flows: {silent} counted none in this run (no"
                 " `hubble_flows_processed_total` in their agents' metrics), so the goal with"
                 " flows is not shown by it. Where the eBPF datapath ignores `--enable-hubble`"
                 " (as on main before issue 31's eBPF flow events), (b) and (e) run the same"
                 " programs, and their ratio — (b) over (e):"
                 f" {b_over_e['new_conn_per_s']:.0%} in connections,"
                 f" {b_over_e['redis_ping_rps']:.0%} in PINGs and"
                 f" {b_over_e['iperf3_gbit_s']:.0%} in throughput — is what the noise alone"
                 " makes of two equal setups.")
    lines += ["", "![datapath](perf-datapath.png)", "", shown, "",
              "Reading: single measurements on this shared 2-core machine wander (the client,"
              " the server and the agent share its two cores with whatever else runs: the load"
              f" average was {dp['load_average_before_after'][0]} before this run and"
              f" {dp['load_average_before_after'][1]} after it; one round's connection ratio of"
              f" (e) to (a) ranged from {spread['e_meshagent_ebpf_no_flows']['new_conn_per_s'][0]}"
              f" to {spread['e_meshagent_ebpf_no_flows']['new_conn_per_s'][1]}), hence the"
              " interleaved rounds and the medians of paired ratios. Why the eBPF datapath's"
              " programs keep up with no programs at all, or beat them: a packet between two"
              " pods of a node is judged by both pods' policies in one program run and"
              " redirected straight into the destination pod (bpf_redirect_peer), skipping the"
              " node's routing and the second veth, as Cilium does; iptables adds netfilter"
              " conntrack to the full path. What bounds the programs: about 0.8 µs per packet"
              " (measured with kernel.bpf_stats_enabled) — an endpoint lookup, the"
              " local-destination lookup and two conntrack lookups (source egress, destination"
              " ingress) — against roughly 20 µs of kernel and application work per request. On"
              " the way: a parse that pulled the payload of every socket-sent packet into the"
              " linear head cost 0.6 µs per packet (now only the header bytes read are pulled,"
              " and only when missing); packets of known connections take one conntrack lookup"
              " per endpoint (the service frontend is looked up only for new connections, and"
              " the NAT lives in the conntrack entry).",
              "",
              "New connections: each is some eight packets (the handshake, PING, PONG, the two"
              " FINs and the last ACK) and, in each pod, a socket set up and torn down, so the"
              " datapath's share of its cost is larger than in a kept-alive PING. A new"
              " connection costs (b), on its first packet, a conntrack miss, the service lookup,"
              " two policy judgements (the ipcache and policy lookups for both pods) and four"
              " conntrack entries written (a forward and a reply entry for each pod); (c) walks"
              " all 1,001 rules for the first packet (the allowed source is last; established"
              " packets stop at the first rule) and creates a netfilter conntrack entry:"
              f" (c) at {ratio['c_iptables']['new_conn_per_s']:.0%} of (a) against"
              f" {ratio['c_iptables']['redis_ping_rps']:.0%} in kept-alive PINGs, and (b) at"
              f" {dp['b_over_c']['new_conn_per_s']:.0%} of (c).", "",
              "What bounds (d), the nftables datapath, at"
              f" {ratio['d_meshagent_nftables']['iperf3_gbit_s']:.0%} /"
              f" {ratio['d_meshagent_nftables']['redis_ping_rps']:.0%} /"
              f" {ratio['d_meshagent_nftables']['new_conn_per_s']:.0%} of (a) and"
              f" {dp['d_over_c']['iperf3_gbit_s']:.0%} /"
              f" {dp['d_over_c']['redis_ping_rps']:.0%} /"
              f" {dp['d_over_c']['new_conn_per_s']:.0%} of iptables: every packet takes the"
              " node's routing between two veths (no redirect into the peer pod), and is judged"
              " twice, leaving one pod and entering the other, each time by a chain of rules:"
              " netdev hooks have no conntrack, so the parse checks, the source check and two"
              " port conversions (nftables keeps values between rules only in mark and priority)"
              " run for every packet, and replies take one reply-set lookup; a set of seen"
              " connections (emptied whenever the endpoint's policy or the ipcache changes)"
              " spares the later packets of a known connection the policy lookups, while a new"
              " connection writes several set entries and logs its events (NFLOG, rate-limited"
              " by `--nftables-event-rate`: what goes over is counted as lost). Throughput"
              " (large segments) suffers less than the request rate (one small packet per"
              " request each way). See docs/nftables.md.", ""]
    return lines


def kvstoremesh_report(kvm: dict) -> list[str]:
    d, c, q = kvm["direct"], kvm["cached"], kvm["direct_over_cached"]

    def most(rows, key):
        return max(row[key] for row in rows)
    rows = [("connections to an etcd from other clusters",
             most(d["connections_per_etcd"], "from_other_clusters"),
             most(c["connections_per_etcd"], "from_other_clusters"),
             q["connections_from_other_clusters"]),
            ("connections to an etcd in all", most(d["connections_per_etcd"], "total"),
             most(c["connections_per_etcd"], "total"), q["connections_total"]),
            ("watchers of an etcd", max(d["watchers_per_etcd"]), max(c["watchers_per_etcd"]),
             q["watchers"]),
            ("etcd CPU seconds, all etcds, start until all synced",
             round(sum(d["etcd_cpu_seconds_during_sync"]), 2),
             round(sum(c["etcd_cpu_seconds_during_sync"]), 2), q["etcd_cpu_during_sync"]),
            ("seconds until every agent synced every remote", d["seconds_to_all_synced"],
             c["seconds_to_all_synced"], q["seconds_to_all_synced"]),
            ("cluster1's etcd restarted: seconds until every agent elsewhere has its next"
             " change", d["seconds_to_all_synced_after_restart"],
             c["seconds_to_all_synced_after_restart"], q["seconds_after_restart"]),
            ("… and the restarted etcd's CPU seconds meanwhile",
             d["restarted_etcd_cpu_seconds_until_synced"],
             c["restarted_etcd_cpu_seconds_until_synced"], q["restarted_etcd_cpu"])]
    return ["## KVStoreMesh", "",
            f"`.venv/bin/python bench/kvstoremesh.py --clusters {kvm['clusters']} --agents"
            f" {kvm['agents_per_cluster']} --entries {kvm['entries_per_cluster']}` —"
            f" {kvm['clusters']} clusters, each with its own etcd holding"
            f" {kvm['keys_per_cluster']:,} keys, and {kvm['agents_per_cluster']} simulated agents"
            " per cluster (the agent's ClusterMesh and ClusterSync code with its own clients and"
            " tables, no datapath), run twice side by side: direct (every agent dials every"
            " remote etcd) and cached (one `meshagent kvstoremesh` per cluster dials them; agents"
            " read their own etcd, as with `--clustermesh-read-cache`).", "",
            "| per etcd (the most loaded) | direct | cached | direct / cached |",
            "|---|---|---|---|",
            *[f"| {name} | {a} | {b} | {r} |" for name, a, b, r in rows], "",
            "![kvstoremesh](perf-kvstoremesh.png)", "",
            "Reading: what the cache buys is connections. Cross-cluster connections fall from"
            " agents × (clusters − 1) to one KVStoreMesh per other cluster (the ratio grows with"
            " the agents: it is their number), an etcd's connections in all fall as well (an"
            " agent reads every remote through the client of its own etcd it holds anyway), and"
            " a remote etcd's restart reconnects those few replicators instead of every agent of"
            " every other cluster. What it costs is a hop: a change is written once more (into"
            " the cache) and travels one more watch, so at this small scale the first sync and"
            " a change after a restart take longer through the cache, and the cache's writes"
            " cost the local etcds CPU that direct reads do not. Watchers do not fall: each"
            " agent still watches every kind of every remote, on its own etcd instead of the"
            " remote's. Cilium's KVStoreMesh makes the same trade.", ""]


NAMES = ("sync", "propagation", "identity", "policy", "datapath", "kvstoremesh")


def with_million(results: dict) -> dict:
    """The million-entry run is not part of ``make bench`` (ten minutes); its last result,
    written by ``bench/clustermesh_sync.py --entries 1000000 --only --json
    bench/results/sync_1m.json``, is reported when there is one."""
    million = RESULTS / "sync_1m.json"
    return results | ({"sync_1m": json.loads(million.read_text())} if million.exists() else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter runs")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite docs/performance.md from bench/results/")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    q = args.quick
    if args.report_only:
        results = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in NAMES}
        plots(results)
        (DOCS / "performance.md").write_text(report(with_million(results), args))
        return
    results = {
        "sync": step("sync", "clustermesh_sync.py", "--entries", "10000" if q else "100000"),
        "propagation": step("propagation", "propagation.py", "--seconds", "5" if q else "30"),
        "identity": step("identity", "identity.py", "--labels", "300" if q else "1000",
                         "--runs", "3" if q else "5"),
        "policy": step("policy", "policy.py", *(["--identities", "2000", "--policies", "200"]
                                                if q else [])),
        "datapath": step("datapath", "datapath.py", "--seconds", "1" if q else "2",
                         "--rounds", "3" if q else "9",
                         *(["--requests", "20000", "--connections", "10000"] if q else [])),
        "kvstoremesh": step("kvstoremesh", "kvstoremesh.py",
                            *(["--agents", "4", "--entries", "500"] if q else [])),
    }
    made = plots(results)
    (DOCS / "performance.md").write_text(report(with_million(results), args))
    print("\n" + (DOCS / "performance.md").read_text().split("## ClusterMesh sync")[0])
    print(f"wrote docs/performance.md and {', '.join(made)}")


if __name__ == "__main__":
    main()
