"""All benchmarks, one report: ``make bench`` (or ``make bench BENCH_ARGS=--quick``) and
``make bench-scale``.

``make bench`` runs the ClusterMesh sync beside its floors (100,000 entries), propagation,
identity allocation, policy resolution, datapath, KVStoreMesh and DNS proxy benchmarks; ``make
bench-scale`` (``--scale``) the million-entry sync beside its floors and the rate curves of the
agent and a bare watcher. Each writes its JSON to bench/results/; the report, docs/performance.md
with its PNG plots, is written from every result there, each section dated by its run. Needs
root (BPF, namespaces).
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


def when(name: str) -> str:
    """The date of a result's run (its file's time)."""
    return time.strftime("%Y-%m-%d", time.localtime((RESULTS / f"{name}.json").stat().st_mtime))


def sync_runs(results: dict) -> list[dict]:
    """The datapath runs of the sync benchmarks, the million's (a run of its own) last."""
    runs = [r for r in results["sync"]["runs"] if r["datapath"]] if "sync" in results else []
    if "sync_1m" in results:
        runs += [r | {"scale": True} for r in results["sync_1m"]["runs"]]
    return runs


def plots(results: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    if runs := sync_runs(results):
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
        xs = [r["entries"] for r in runs]
        ax[0].plot(xs, [r["seconds_to_all_in_bpf"] for r in runs], "o-",
                   label="agent: all in the BPF ipcache")
        ax[0].plot(xs, [r["budget_s"] for r in runs], "--", color="grey",
                   label="goal: 2 × read floor + start-up floor")
        ax[0].plot(xs, [r["read_floor_s"] for r in runs], ":", color="tab:green",
                   label="read floor")
        ax[0].plot(xs, [r["budget_s"] - 2 * r["read_floor_s"] for r in runs], "-.",
                   color="tab:purple", label="start-up floor")
        ax[0].set(xscale="log", yscale="log", xlabel="remote ipcache entries", ylabel="seconds",
                  title="ClusterMesh sync")
        ax[0].legend(fontsize=7)
        ax[1].plot(xs, [r["peak_rss_mib"] for r in runs], "o-", color="tab:orange")
        ax[1].axhline(512, color="grey", linestyle="--", label="goal at 1,000,000: 512 MiB")
        ax[1].set(xscale="log", xlabel="remote ipcache entries", ylabel="peak RSS (MiB)",
                  title="agent memory")
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(DOCS / "perf-sync.png", dpi=90)
        made.append("perf-sync.png")
    if "rate" in results:
        plot_rate(results["rate"])
        made.append("perf-rate.png")
    if "datapath" in results:
        plot_datapath(results["datapath"])
        made.append("perf-datapath.png")
    if "kvstoremesh" in results:
        plot_kvstoremesh(results["kvstoremesh"])
        made.append("perf-kvstoremesh.png")
    return made


def plot_rate(rate: dict) -> None:
    """p99 against the offered rate, each subject's probes; a hollow marker: fell behind."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, color, label in (("bare", "tab:green", "bare watcher (watch + decode)"),
                               ("agent", "tab:blue", "agent (put → BPF ipcache)")):
        if name not in rate:
            continue
        last = {p["offered_per_s"]: p for p in rate[name]["probes"]}  # a repeat, if any
        probes = [p for _, p in sorted(last.items()) if p["p99_ms"] is not None]
        xs = [p["offered_per_s"] for p in probes]
        ax.plot(xs, [p["p99_ms"] for p in probes], "-", color=color, label=label)
        for p in probes:
            ax.plot(p["offered_per_s"], p["p99_ms"], "o", color=color,
                    fillstyle="full" if p["kept_up"] else "none")
        ax.axvline(rate[name]["sustained_per_s"], color=color, linestyle=":", linewidth=1)
    ax.axhline(rate["p99_ms_goal"], color="grey", linestyle="--",
               label=f"p99 {rate['p99_ms_goal']:g} ms")
    ax.set(yscale="log", xlabel="offered remote updates/s", ylabel="p99 latency (ms)",
           title="highest sustained update rate (dotted: each subject's)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "perf-rate.png", dpi=90)


def plot_kvstoremesh(kvm: dict) -> None:
    import matplotlib.pyplot as plt
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


MODES = ("direct", "cached")


def yes(ok: bool) -> str:
    return "met" if ok else "**missed**"


NOT_RUN = "not in bench/results/"


def summary(results: dict) -> list[str]:
    """Every goal of issue 32, each agent figure beside its floor, then the earlier goals."""
    rows = ["| goal | agent | floor, same run | ratio | |", "|---|---|---|---|---|"]

    def missing(goal: str, command: str) -> None:
        rows.append(f"| {goal} | {NOT_RUN} (`{command}`) | | | |")
    for name in ("sync", "sync_1m"):
        sync = results.get(name)
        command = "make bench" if name == "sync" else "make bench-scale"
        if sync is None:
            missing("sync to ready and in the BPF ipcache ≤ 2 × read floor + start-up floor",
                    command)
            continue
        s, full = sync["startup_floor"], sync["full"]
        if name == "sync":
            rows.append(f"| start-up to ready, eBPF datapath, no remote entries ≤ 1 s |"
                        f" {s['seconds']} s (first run {s['first_run_seconds']} s) | | |"
                        f" {yes(sync['goal_startup_le_1s'])} |")
        rows.append(f"| {full['entries']:,} remote entries to ready and in the BPF ipcache ≤ 2 ×"
                    f" read floor + start-up floor ({when(name)}) |"
                    f" {full['seconds_to_all_in_bpf']} s | read {full['read_floor_s']} s,"
                    f" start-up {s['seconds']} s: goal {full['budget_s']} s |"
                    f" {full['over_budget']} of the goal; beyond start-up"
                    f" {full['beyond_startup_over_read_floor']}× the read floor |"
                    f" {yes(full['goal_within_budget'])} |")
        if full["entries"] >= 1_000_000:
            rows.append(f"| … {full['entries']:,} entries in ≤ 512 MiB peak RSS |"
                        f" {full['peak_rss_mib']} MiB ({full['kib_per_entry']} KiB an entry) |"
                        f" | | {yes(sync['goal_rss_le_512mib'])} |")
    if (rate := results.get("rate")) is not None and {"bare", "agent"} <= rate.keys():
        bare = rate["bare"]
        ratio = f"{rate['agent_over_bare']:.0%}" if "agent_over_bare" in rate else "-"
        rows.append(f"| highest sustained update rate, p99 put → BPF ≤ {rate['p99_ms_goal']:g} ms,"
                    f" ≥ 80% of a bare watcher's ({when('rate')}) |"
                    f" {rate['agent']['sustained_per_s']:,}/s |"
                    f" bare watcher {bare['sustained_per_s']:,}/s"
                    f"{' (the writers were the bound)' if bare['writer_bound'] else ''} |"
                    f" {ratio} | {yes(rate.get('goal_agent_ge_80pct_of_bare', False))} |")
    else:
        missing("highest sustained update rate ≥ 80% of a bare watcher's", "make bench-scale")
    if (dp := results.get("datapath")) is not None:
        d, d_c = dp["ratio_to_a"]["d_meshagent_nftables"], dp["d_over_c"]
        rows += [f"| nftables throughput and request rate ≥ 90% of no programs |"
                 f" {d['iperf3_gbit_s']:.0%} / {d['redis_ping_rps']:.0%} | (a) no programs | |"
                 f" {yes(d['iperf3_gbit_s'] >= 0.9 and d['redis_ping_rps'] >= 0.9)} |",
                 f"| … and ≥ the same policy in iptables | {d_c['iperf3_gbit_s']:.0%} /"
                 f" {d_c['redis_ping_rps']:.0%} of iptables | (c) iptables | |"
                 f" {yes(d_c['iperf3_gbit_s'] >= 1 and d_c['redis_ping_rps'] >= 1)} |"]
    else:
        missing("nftables ≥ 90% of no programs and ≥ iptables", "make bench")
    if (kvm := results.get("kvstoremesh")) is not None and "agents_watchers_per_etcd" in kvm[
            "cached"]:
        direct, cached = (max(kvm[m]["agents_watchers_per_etcd"]) for m in MODES)
        rows.append(f"| KVStoreMesh: agents' watchers per etcd fall by the number of remote"
                    f" clusters ({kvm['clusters'] - 1}) | {cached} cached | {direct} direct |"
                    f" {direct / max(cached, 1):.2f}× fewer | {yes(kvm['goal_agents_watchers_fall'])} |")
    else:
        missing("KVStoreMesh: agents' watchers per etcd fall", "make bench")
    if (pol := results.get("policy")) is not None and "full_resolution_cold_s" in pol:
        rows += [f"| full policy resolution cold ≤ 100 ms ({pol['identities']:,} identities ×"
                 f" {pol['policies']:,} policies × {pol['endpoints']} endpoints) |"
                 f" {pol['full_resolution_cold_s'] * 1000:.0f} ms | | |"
                 f" {yes(pol['goal_cold_le_100ms'])} |",
                 f"| incremental policy update ≤ 1 ms | {pol['incremental_add_ms_median']} ms"
                 f" (max {pol['incremental_add_ms_max']}) | | | {yes(pol['goal_incremental_le_1ms'])} |"]
    else:
        missing("full policy resolution cold ≤ 100 ms", "make bench")
    rows += ["", "Earlier goals:", "", "| goal | measured | |", "|---|---|---|"]
    if (prop := results.get("propagation")) is not None:
        rows.append(f"| propagation p99 ≤ 100 ms at {prop['rate_per_s']}/s | {prop['p99_ms']} ms |"
                    f" {yes(prop['goal_p99_le_100ms'])} |")
    if dp is not None:
        rows += datapath_summary(dp)
    if (ids := results.get("identity")) is not None:
        rows.append(f"| identity allocation ≥ 1,000 new identities/s, {ids['agents']} agents racing |"
                    f" {ids['new_identities_per_s']}/s (median of {ids['runs']}) |"
                    f" {yes(ids['new_identities_per_s'] >= 1000 and ids['all_agents_agree_and_ids_distinct'])}"
                    " |")
    if kvm is not None:
        rows.append(f"| KVStoreMesh: connections to an etcd from other clusters, direct / cached |"
                    f" {kvm['direct_over_cached']['connections_from_other_clusters']}× fewer"
                    " cached | (measured) |")
    return rows


def report(results: dict, args) -> str:
    machine = next(r["machine"] for r in results.values() if "machine" in r)
    lines = [
        "# Performance", "",
        f"Written by bench/run.py on {machine}, {time.strftime('%Y-%m-%d')}, from the results"
        " of `make bench` (ClusterMesh sync of 100,000 entries, propagation, identities, policy,"
        " datapath, KVStoreMesh) and `make bench-scale` (a million entries, the rate curves);"
        " each section names the day of its run and the command that reproduces it alone."
        " Every figure is measured, its floor beside it in the same run: the **read floor** (a"
        " bare Python reader listing and decoding the same etcd keys, no agent), the **watch"
        " floor** (a bare watcher's highest sustained rate, same writer, same etcd) and the"
        " **start-up floor** (the agent's own start to ready with no remote entries).", "",
        "## Summary", "", *summary(results), ""]
    lines += sync_report(results)
    lines += rate_report(results.get("rate"))
    if (prop := results.get("propagation")) is not None:
        lines += [f"## Propagation ({when('propagation')})", "",
                  f"`.venv/bin/python bench/propagation.py --rate {prop['rate_per_s']} --seconds"
                  f" {prop['seconds']:g}` — remote ipcache puts at a steady rate (a separate"
                  " writer process); latency from each put to the local BPF map update.", "",
                  "| written | applied | p50 | p99 | max | kept up |", "|---|---|---|---|---|---|",
                  f"| {prop['written']:,} | {prop['applied']:,} | {prop['p50_ms']} ms |"
                  f" {prop['p99_ms']} ms | {prop['max_ms']} ms | {prop['kept_up']} |", ""]
    if (ids := results.get("identity")) is not None:
        lines += identity_report(ids)
    if (kvm := results.get("kvstoremesh")) is not None:
        lines += kvstoremesh_report(kvm)
    if (pol := results.get("policy")) is not None:
        lines += policy_report(pol)
    if (dp := results.get("datapath")) is not None:
        lines += datapath_report(dp)
    if (dns := results.get("dnsproxy")) is not None:
        lines += dnsproxy_report(dns)
    return "\n".join(lines)


def dnsproxy_report(dns: dict) -> list[str]:
    """The DNS proxy's cost per lookup beside the same server reached straight."""
    lines = [f"## DNS proxy ({when('dnsproxy')})", "",
             f"`.venv/bin/python bench/dnsproxy.py --seconds {dns['seconds']:g}` — a pod's"
             " lookups (each a new name) through the DNS proxy (TPROXY, rules checked, the"
             " answer's address given an fqdn identity; no datapath wait) and straight to the"
             " same dnsmasq, one after the other in one run (docs/dns.md).", "",
             "| path | in flight | lookups/s | p50 | p99 | errors | proxy CPU per lookup |",
             "|---|---|---|---|---|---|---|"]
    for r in dns["runs"]:
        lines.append(f"| {r['path']} | {r['concurrency']} | {r['lookups_per_s']:,} |"
                     f" {r['p50_ms']} ms | {r['p99_ms']} ms | {r['errors']} |"
                     f" {r['proxy_cpu_ms_per_lookup']} ms |")
    return lines + [""]


def sync_report(results: dict) -> list[str]:
    if "sync" not in results and "sync_1m" not in results:
        return []
    lines = ["## ClusterMesh sync", "",
             "`.venv/bin/python bench/clustermesh_sync.py --entries 100000` (`make bench`) and"
             " `… --entries 1000000 --only` (`make bench-scale`) — a remote etcd holding N"
             " ipcache entries, N/10 identities (60,000 at most), N/100 nodes and N/100"
             " services; time from agent start until the remote is ready and every entry is in"
             " the BPF ipcache; the agent's peak RSS. Beside each, in the same run: the read"
             " floor of the same keys (the etcd plugin's `list_pages` and `json.loads` of every"
             " value, or the split of an identity's labels; one task per kind as the agent"
             " reads them; the median of three, on a connected client) and the start-up floor"
             " (below). Goal: seconds to all in the BPF ipcache ≤ 2 × read floor + start-up"
             " floor.", "",
             "| run | entries (keys) | read floor | seconds to ready | all in BPF ipcache |"
             " goal | of the goal | peak RSS | KiB an entry |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ("sync", "sync_1m"):
        for r in results.get(name, {}).get("runs", []):
            label = f"{r['entries']:,} ({r['keys']:,})" + ("" if r["datapath"] else
                                                           ", no datapath")
            lines.append(f"| {when(name)} | {label} | {r['read_floor_s']} s |"
                         f" {r['seconds_to_ready']} s | {seconds(r['seconds_to_all_in_bpf'])} |"
                         f" {seconds(r.get('budget_s'))} | {r.get('over_budget', '-')} |"
                         f" {r['peak_rss_mib']} MiB | {r['kib_per_entry']} |")
    lines += ["", "![sync](perf-sync.png)", "",
              "The no-datapath row is the control: it runs no datapath code at all, so when it"
              " moves between two runs the machine moved. This shared 2-core machine varies by"
              " 2–3× between days; compare only figures of one run (hence the floors beside"
              " each figure), or run the previous commit side by side from a git worktree with"
              " its own venv.", "", "### Start-up floor", ""]
    for name in ("sync", "sync_1m"):
        if name not in results:
            continue
        s = results[name]["startup_floor"]
        phases = s["log_seconds_to"]
        lines.append(
            f"{when(name)} (`{'make bench' if name == 'sync' else 'make bench-scale'}`): the"
            f" agent above, its remote holding no entries (only its cluster config and sync"
            f" canaries), started {s['runs']} times with a fresh bpffs (the state dir kept, as on a"
            f" node): ready in"
            f" {s['seconds']} s (the median after the first; each: {', '.join(map(str, s['each']))}"
            f" s; the first, whose program cache if any is cold, {s['first_run_seconds']} s). What"
            f" it spends its time on: a fresh interpreter importing `meshagent.cli` takes"
            f" {s['import_meshagent_cli_seconds']} s; by its log the agent says"
            f" \"agent started\" (imports, plugins, options, the state dir) {phases.get('started', '?')} s"
            f" after the process started and \"agent ready\" (the controllers, the datapath's"
            f" programs compiled and loaded, the remote connected and synced)"
            f" {phases.get('ready', '?')} s after.{longest_wait(s.get('last_log', []))}")
        lines.append("")
    return lines


def longest_wait(log: list[list]) -> str:
    """The longest silence in a start-up's log, and the line that ended it."""
    gaps = [(b[0] - a[0], b[1]) for a, b in zip(log, log[1:])]
    if not gaps:
        return ""
    gap, message = max(gaps)
    return (f" In the last run the log's longest silence was {gap:.2f} s, ended by"
            f" \"{message}\".")


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value} s"


def rate_report(rate: dict | None) -> list[str]:
    if rate is None:
        return []
    lines = [f"## Update rate ({when('rate')}, `make bench-scale`)", "",
             f"`.venv/bin/python bench/rate.py --seconds {rate['seconds']:g} --writers"
             f" {rate['writers']}` — probes of {rate['seconds']:g} s each, each on a fresh etcd"
             f" and a fresh subject: {rate['writers']} writer processes put new remote ipcache"
             " entries at the offered rate between them (a put each, so one etcd revision and one"
             " watch event per update), each value carrying its put time. A probe passes when"
             f" every update arrived within the probe and {rate['drain']:g} s after it, with p99"
             f" ≤ {rate['p99_ms_goal']:g} ms over the updates put after its first"
             f" {rate.get('warmup', 0):g} s (a sustained rate). The rate doubles until a rate"
             f" fails (its probe failed {1 + rate.get('retries', 0)} times in a row), then is"
             f" bisected to ±{rate['precision_per_s']}/s. Subjects: the bare watcher (the watch"
             " floor: the etcd plugin's watch of the ipcache prefix and `json.loads` of each"
             " value, nothing else) and the agent (received when its eBPF datapath has written"
             " the entry into the BPF ipcache). The writers, etcd and the subject share the"
             f" machine's cores. The whole curve took {rate['wall_seconds']} s.", "",
             "| subject | highest sustained | first failing | probes (offered/s: p50 / p99 ms,"
             " kept up) |", "|---|---|---|---|"]
    for name in ("bare", "agent"):
        if name not in rate:
            continue
        r = rate[name]
        probes = "; ".join(probe_text(p) for p in r["probes"])
        failing = r["first_failing_per_s"]
        lines.append(f"| {name} | {r['sustained_per_s']:,}/s |"
                     f" {'-' if failing is None else f'{failing:,}/s'} | {probes} |")
    if "agent_over_bare" in rate:
        lines += ["", f"The agent sustains {rate['agent_over_bare']:.0%} of the bare watcher's"
                  f" rate (goal ≥ 80%)."
                  + (" The bare watcher's figure is the writers' bound, not its own: they fell"
                     " short of the first failing rate (or it passed every rate probed)."
                     if rate["bare"]["writer_bound"] else "")]
    lines += ["", "![rate](perf-rate.png)", ""]
    return lines


def probe_text(p: dict) -> str:
    """One probe: the offered rate, p50 / p99, whether it fell behind or the writers did."""
    text = f"{p['offered_per_s']:,}: {p['p50_ms']} / {p['p99_ms']}"
    if not p["kept_up"]:
        text += ", behind"
    if p["written_per_s"] < 0.95 * p["offered_per_s"]:
        text += f" (writers reached {p['written_per_s']:,}/s)"
    return text
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


def datapath_summary(dp: dict) -> list[str]:
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
    lines = [f"## Datapath overhead ({when('datapath')})", "",
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
              " node's routing between two veths (no redirect into the peer pod) and is looked"
              " at twice, leaving one pod and entering the other. Netdev hooks have no"
              " conntrack, so the datapath keeps its own: a packet of a connection already"
              " judged under the current policy and ipcache (TCP without SYN, FIN or RST, UDP,"
              " SCTP, no fragment) passes at the top of its chain after one lookup in the"
              " endpoint's established set, which every policy, ipcache or audit-mode change"
              " empties so that each connection is judged once more. A new connection walks"
              " the whole chain (parse checks, source check, port conversions, policy lookups),"
              " writes several set entries and logs its events (NFLOG, rate-limited by"
              " `--nftables-event-rate`: what goes over is counted as lost); a closed one"
              " (FIN both ways, or RST) has its entries cut to 10 s. See docs/nftables.md.", ""]
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
            *([("… the agents' own (gone once they stop)", max(d["agents_watchers_per_etcd"]),
                max(c["agents_watchers_per_etcd"]), q["agents_watchers"])]
              if "agents_watchers" in q else []),
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
    return [f"## KVStoreMesh ({when('kvstoremesh')})", "",
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
            " cost the local etcds CPU that direct reads do not. Watchers: read directly, an"
            " agent watches every kind of every remote on the remote's etcd; read through the"
            " cache, an agent holds one watch per kind over every cached cluster (a SharedWatch,"
            " docs/kvstoremesh.md), so the agents' watchers of an etcd fall by the number of"
            " remote clusters; what remains is every other cluster's KVStoreMesh watching this"
            " cluster's state.", ""]


def identity_report(ids: dict) -> list[str]:
    return [f"## Identity allocation ({when('identity')})", "",
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
            " agents and etcd share two cores, and each RPC costs both some.", ""]


def policy_report(pol: dict) -> list[str]:
    return [f"## Policy resolution ({when('policy')})", "",
            f"`.venv/bin/python bench/policy.py --identities {pol['identities']} --policies"
            f" {pol['policies']} --endpoints {pol['endpoints']}` — cold: a fresh interpreter"
            " (nothing cached by an earlier resolver or import), an empty resolver given every"
            " identity, then every policy, then every endpoint, timed from the resolver's"
            " creation until every endpoint is resolved (the policies parsed before; the median"
            " of three interpreters); the endpoints alone: the same after identities and"
            " policies are in; incremental: one identity added that several selectors match.",
            "",
            "| map entries | full resolution cold (each) | endpoints alone |"
            " one incremental identity add (median / max) | cold / incremental |",
            "|---|---|---|---|---|",
            f"| {pol['map_entries']:,} | {pol['full_resolution_cold_s'] * 1000:.0f} ms"
            f" ({', '.join(f'{c * 1000:.0f}' for c in pol['full_resolution_cold_each_s'])}) |"
            f" {pol['full_resolution_s'] * 1000:.0f} ms |"
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


BENCH = ("sync", "propagation", "identity", "policy", "datapath", "kvstoremesh")
SCALE = ("sync_1m", "rate")


def saved() -> dict:
    """Every result in bench/results/ (a run of ``make bench`` or ``make bench-scale``)."""
    return {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in BENCH + SCALE
            if (RESULTS / f"{name}.json").exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter runs")
    parser.add_argument("--scale", action="store_true",
                        help="the million-entry sync and the rate curves (make bench-scale)")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite docs/performance.md from bench/results/")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    q = args.quick
    started = time.monotonic()
    if args.report_only:
        pass
    elif args.scale:
        step("sync_1m", "clustermesh_sync.py", "--entries", "100000" if q else "1000000",
             "--only")
        step("rate", "rate.py", *(["--seconds", "3", "--precision", "1000"] if q else []))
    else:
        step("sync", "clustermesh_sync.py", "--entries", "10000" if q else "100000")
        step("propagation", "propagation.py", "--seconds", "5" if q else "30")
        step("identity", "identity.py", "--labels", "300" if q else "1000",
             "--runs", "3" if q else "5")
        step("policy", "policy.py", *(["--identities", "2000", "--policies", "200"]
                                      if q else []))
        step("datapath", "datapath.py", "--seconds", "1" if q else "2",
             "--rounds", "3" if q else "9",
             *(["--requests", "20000", "--connections", "10000"] if q else []))
        step("kvstoremesh", "kvstoremesh.py", *(["--agents", "4", "--entries", "500"]
                                                if q else []))
        step("dnsproxy", "dnsproxy.py", "--seconds", "2" if q else "5")
    results = saved()
    made = plots(results)
    (DOCS / "performance.md").write_text(report(results, args))
    print("\n" + (DOCS / "performance.md").read_text().split("## ClusterMesh sync")[0])
    print(f"wrote docs/performance.md and {', '.join(made)}"
          f" ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
