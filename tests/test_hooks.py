"""Each hook fires when its spec says, with the arguments it says."""

import asyncio
import ipaddress

import pytest
from conftest import run_cli
from prometheus_client import Counter

import meshagent
from meshagent.errors import PluginError, UsageError
from meshagent.events import ChangeKind, PolicyChange
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import Identity
from meshagent.model.ipcache import IPCacheEntry
from meshagent.model.node import Node
from meshagent.model.service import Service
from meshagent.plugin import Answer
from meshagent.runtime.status import Health, StatusSection
from meshagent.testing.resolver_contract import RecordingDatapath


class Lifecycle:
    """Records lifecycle hooks in order."""

    def __init__(self):
        self.calls = []

    @meshagent.hookimpl
    def meshagent_addoption(self, parser):
        parser.getgroup("lifecycle").addoption("lifecycle-greeting", default="hi", help="x")
        self.calls.append("addoption")

    @meshagent.hookimpl
    def meshagent_configure(self, config, pluginmanager):
        self.calls.append(("configure", config.get("lifecycle-greeting")))
        assert pluginmanager.pm.get_plugin("lifecycle") is self

    @meshagent.hookimpl
    def meshagent_register_metrics(self, registry):
        self.calls.append("register_metrics")

    @meshagent.hookimpl
    def meshagent_api_routes(self, agent):
        self.calls.append("api_routes")

    @meshagent.hookimpl
    def meshagent_controllers(self, agent):
        self.calls.append("controllers")
        self.agent = agent

    @meshagent.hookimpl
    def meshagent_unconfigure(self, config):
        self.calls.append("unconfigure")


async def test_lifecycle_order(agent_factory):
    plugin = Lifecycle()
    running = await agent_factory(["--plugins", "memory", "--lifecycle-greeting", "hello"],
                                  extra_plugins=[("lifecycle", plugin)])
    # addoption is historic: a plugin registered after the parser exists still adds options
    assert plugin.calls == ["addoption", ("configure", "hello"), "register_metrics",
                            "api_routes", "controllers"]
    # what plugins are handed is a view of the agent as the public protocol describes it,
    # never the agent itself
    from meshagent.plugin import AgentView
    assert isinstance(plugin.agent, AgentView) and plugin.agent.endpoints is not None
    assert plugin.agent is not running.agent and not hasattr(plugin.agent, "datapath")
    await running.stop()
    assert plugin.calls[-1] == "unconfigure"


class Rejecting:
    @meshagent.hookimpl
    def meshagent_configure(self, config):
        raise UsageError("invalid --reject-me: always")


async def test_configure_may_reject_before_side_effects(agent_factory, short_tmp):
    with pytest.raises(UsageError, match="invalid --reject-me"):
        await agent_factory(extra_plugins=[("rejecting", Rejecting())])
    assert not (short_tmp / "state0").exists()


class FakeSlots:
    """Test doubles for the slots no built-in plugin fills yet: they record what the core does."""

    def __init__(self):
        self.events = []

    @meshagent.hookimpl
    def meshagent_register_identity_allocator(self, registry):
        registry.register("fake-ids", lambda agent: self._Provider(self, "identity"))

    @meshagent.hookimpl
    def meshagent_register_policy_resolver(self, registry):
        registry.register("fake-policy", lambda agent: self._Provider(self, "policy"))

    @meshagent.hookimpl
    def meshagent_register_datapath(self, registry):
        registry.register("fake-dp", lambda agent: self._Provider(self, "datapath"))

    class _Provider(RecordingDatapath):
        """Meets the identity allocator, policy resolver and datapath contracts, doing
        nothing but recording its life."""

        revision = 0

        def __init__(self, owner, kind):
            super().__init__()
            self.owner, self.kind = owner, kind
            owner.events.append(f"{kind} built")

        async def start(self):
            self.owner.events.append(f"{self.kind} started")

        async def stop(self):
            self.owner.events.append(f"{self.kind} stopped")

        async def close(self):
            self.owner.events.append(f"{self.kind} closed")

        async def allocate(self, labels):
            self.owner.events.append(f"{self.kind} allocated")
            return Identity(256, frozenset(labels))

        async def release(self, identity):
            return False

        def lookup(self, identity_id):
            return None

        async def import_policies(self, text, source):
            return []

        async def store(self, policies):
            pass

        async def delete(self, kind, namespace, name):
            return False

        def policies(self):
            return []

        def trace(self, dst_endpoint, port, protocol="TCP", **source):
            return {}

        def snapshot(self):
            return {}

        async def changes(self):
            await asyncio.Event().wait()



async def test_a_provider_that_does_not_meet_its_slot_is_refused_naming_its_plugin(
        agent_factory):
    class Half:
        async def start(self):
            pass

    class Offers:
        @meshagent.hookimpl
        def meshagent_register_datapath(self, registry):
            registry.register("half", lambda agent: Half())

    with pytest.raises(PluginError, match=r"datapath provider 'half' of plugin 'halfdp' does"
                       r" not meet meshagent\.plugin\.Datapath: missing apply, reconcile,"
                       r" stop"):
        await agent_factory(extra_plugins=[("halfdp", Offers())])


async def test_every_slot_is_filled_built_started_and_closed(agent_factory):
    fake = FakeSlots()
    running = await agent_factory(["--plugins", "memory", "--identity-allocator", "fake-ids",
                                   "--policy-resolver", "fake-policy"],
                                  extra_plugins=[("fake", fake)])
    agent = running.agent
    assert {slot: p.name for slot, p in agent.providers.items()} == {
        "kvstore": "memory", "identity-allocator": "fake-ids",
        "policy-resolver": "fake-policy", "datapath": "fake-dp"}
    assert fake.events == ["identity built", "policy built", "datapath built", "datapath started"]
    status = await running.client.request("GET", "/status")
    assert "Datapath" not in {s["name"] for s in status["sections"]}  # no longer "Disabled"
    await running.stop()
    assert fake.events[-3:] == ["datapath stopped", "policy closed", "identity closed"]  # reversed


async def test_event_hooks_reach_every_observer(agent_factory, hook_recorder):
    running = await agent_factory(["--plugins", "memory,audit"],
                                  extra_plugins=[("recorder", hook_recorder)])
    # the agent's own node came first, published and synced back from the kvstore
    assert [(k, n.name) for k, n in hook_recorder.of("node")] == [
        (ChangeKind.UPSERT, running.agent.config.node_name)]
    hook_recorder.calls.clear()
    hooks = running.agent.hooks
    ip = ipaddress.ip_address("10.1.0.5")
    objects = {
        "node": Node("node1", "cluster1", 101, ipaddress.ip_address("10.1.1.1"),
                     (ipaddress.ip_network("10.1.0.0/24"),)),
        "identity": Identity(6619392, frozenset({"k8s:app=employee"})),
        "ipcache": IPCacheEntry(ipaddress.ip_network("10.1.0.5/32"), 6619392, "cluster1"),
        "endpoint": Endpoint(1, "default", frozenset({"k8s:app=employee"}), ip, 6619392),
        "policy": PolicyChange("clustermesh-ingress-l4-policy", "default", 1),
        "service": Service("default", "protected-db", "cluster1", global_=True),
    }
    hooks.node_changed(kind=ChangeKind.UPSERT, node=objects["node"])
    hooks.identity_changed(kind=ChangeKind.UPSERT, identity=objects["identity"])
    hooks.ipcache_changed(kind=ChangeKind.UPSERT, entry=objects["ipcache"])
    hooks.endpoint_changed(kind=ChangeKind.UPSERT, endpoint=objects["endpoint"])
    hooks.policy_changed(kind=ChangeKind.UPSERT, policy=objects["policy"])
    hooks.service_changed(kind=ChangeKind.DELETE, service=objects["service"])
    for name in ("node", "identity", "ipcache", "endpoint", "policy"):
        assert hook_recorder.of(name) == [(ChangeKind.UPSERT, objects[name])]
    assert hook_recorder.of("service") == [(ChangeKind.DELETE, objects["service"])]
    recent = (await running.client.request("GET", "/audit"))[-6:]
    assert [(e["kind"], e["change"]) for e in recent] == [
        ("node", "upsert"), ("identity", "upsert"), ("ipcache", "upsert"),
        ("endpoint", "upsert"), ("policy", "upsert"), ("service", "delete")]
    assert recent[0]["object"]["ipv4"] == "10.1.1.1"


class RaisingObserver:
    @meshagent.hookimpl
    def meshagent_node_changed(self, kind, node):
        raise RuntimeError("observer bug")


async def test_a_raising_observer_does_not_starve_the_others(agent_factory, hook_recorder):
    running = await agent_factory(extra_plugins=[("recorder", hook_recorder),
                                                 ("raising", RaisingObserver())])
    node = Node("n", "c", 0)
    errors_before = running.agent.hooks.errors  # the agent's own node raised there too
    hook_recorder.calls.clear()
    running.agent.hooks.node_changed(kind=ChangeKind.UPSERT, node=node)
    assert hook_recorder.of("node") == [(ChangeKind.UPSERT, node)]
    assert running.agent.hooks.errors == errors_before + 1


class StatusPlugin:
    @meshagent.hookimpl
    def meshagent_status(self, agent, verbose):
        return [StatusSection("Widgets", Health.OK, "3 widgets",
                              details=["costly detail"] if verbose else []),
                StatusSection("Gadgets", Health.WARNING, "1 gadget is late")]


class BrokenStatus:
    @meshagent.hookimpl
    def meshagent_status(self):
        raise KeyError("oops")


async def test_status_sections_from_plugins(agent_factory):
    running = await agent_factory(extra_plugins=[("widgets", StatusPlugin())])
    status = await running.client.request("GET", "/status", params={"verbose": "true"})
    names = [s["name"] for s in status["sections"]]
    assert names.index("KVStore") < names.index("Controllers") < names.index("Gadgets")
    widgets = next(s for s in status["sections"] if s["name"] == "Widgets")
    assert widgets == {"name": "Widgets", "health": "Ok", "summary": "3 widgets",
                       "details": ["costly detail"], "plugin": "widgets"}


async def test_a_failing_status_hook_becomes_a_failure_section(agent_factory):
    running = await agent_factory(extra_plugins=[("brokenstatus", BrokenStatus())])
    status = await running.client.request("GET", "/status")
    broken = next(s for s in status["sections"] if s["name"] == "brokenstatus")
    assert broken["health"] == "Failure" and "KeyError" in broken["summary"]
    # the CLI reports an unhealthy agent with exit code 1
    from meshagent.runtime.clioutput import status_report_from_json
    assert status_report_from_json(status).healthy is False


class MetricsPlugin:
    @meshagent.hookimpl
    def meshagent_register_metrics(self, registry):
        self.counter = Counter("meshagent_test_widgets", "widgets seen", registry=registry)


async def test_register_metrics_uses_the_agents_registry(agent_factory):
    plugin = MetricsPlugin()
    running = await agent_factory(extra_plugins=[("metrics", plugin)])
    plugin.counter.inc(3)
    assert running.agent.metrics.get_sample_value("meshagent_test_widgets_total") == 3


def test_commands_hook_adds_cli_commands():
    result = run_cli("audit", "--help")
    assert result.returncode == 0
    assert "most recent recorded changes" in result.stdout and "--limit" in result.stdout


async def test_endpoint_labels_are_the_union_of_what_plugins_know(agent_factory):
    """``meshagent_endpoint_labels``: None means "not mine"; an error names the pod."""
    class Registry:
        @meshagent.hookimpl
        def meshagent_endpoint_labels(self, agent, namespace, pod_name):
            async def labels():
                if pod_name == "broken":
                    raise UsageError(f"pod {namespace}/{pod_name}: unreadable")
                return [f"k8s:app={pod_name}"]
            return labels() if namespace == "default" else None

    class Team:
        @meshagent.hookimpl
        def meshagent_endpoint_labels(self, namespace, pod_name):
            async def labels():
                return {"k8s:team=blue"}
            return labels()

    running = await agent_factory(extra_plugins=[("registry", Registry()), ("team", Team())])
    hooks, agent = running.agent.hooks, running.agent
    assert await hooks.endpoint_labels(agent=agent, namespace="default", pod_name="db") == {
        "k8s:app=db", "k8s:team=blue"}
    assert await hooks.endpoint_labels(agent=agent, namespace="other", pod_name="db") == {
        "k8s:team=blue"}
    with pytest.raises(UsageError, match="pod default/broken: unreadable"):
        await hooks.endpoint_labels(agent=agent, namespace="default", pod_name="broken")


# ------------------------------------------------------------------------------------------
# every hook goes through pluggy's caller: wrappers, ordering, monitoring, check_pending
# ------------------------------------------------------------------------------------------


class Misspelled:
    @meshagent.hookimpl
    def meshagent_ipcache_change(self, kind, entry):  # sic: the hook is meshagent_ipcache_changed
        raise AssertionError("never called")


async def test_a_misspelled_hook_stops_start_up_naming_plugin_and_hook(agent_factory, short_tmp):
    with pytest.raises(PluginError, match=r"plugin 'typo' implements unknown hook"
                       r" meshagent_ipcache_change: .*did you mean meshagent_ipcache_changes"
                       r" or meshagent_ipcache_changed\?"):
        await agent_factory(extra_plugins=[("typo", Misspelled())])
    assert not (short_tmp / "state0").exists()  # refused before any side effect


async def test_a_misspelled_hook_registered_by_a_provider_stops_start_up(agent_factory):
    """An object a provider's factory registers is checked too, before the API opens."""
    class Offers:
        @meshagent.hookimpl
        def meshagent_register_datapath(self, registry):
            def build(agent):
                agent.plugins.register(Misspelled(), name="typodp.state")
                return RecordingDatapath()
            registry.register("typodp", build)

    with pytest.raises(PluginError, match=r"plugin 'typodp.state' implements unknown hook"
                                          r" meshagent_ipcache_change"):
        await agent_factory(extra_plugins=[("typodp", Offers())])


async def test_an_optionalhook_of_no_spec_is_allowed(agent_factory):
    class Optional:
        @meshagent.hookimpl(optionalhook=True)
        def meshagent_some_future_hook(self):
            pass

    running = await agent_factory(extra_plugins=[("optional", Optional())])
    assert running.agent.ready


class WrapsStatus:
    """A new-style wrapper: sees each plugin's answer, drops one, adds its own."""

    def __init__(self):
        self.seen = []

    @meshagent.hookimpl(wrapper=True)
    def meshagent_status(self, verbose):
        answers = yield
        self.seen.append((verbose, sorted(a.plugin for a in answers)))
        return [a for a in answers if a.plugin != "widgets"] + [
            Answer("wrapper", StatusSection("Wrapped", Health.OK, f"{len(answers)} answers"))]


async def test_a_wrapper_sees_and_changes_a_collected_hook(agent_factory):
    wrapper = WrapsStatus()
    running = await agent_factory(extra_plugins=[("widgets", StatusPlugin()),
                                                 ("wrapper", wrapper)])
    status = await running.client.request("GET", "/status", params={"verbose": "true"})
    by_name = {s["name"]: s for s in status["sections"]}
    assert "Widgets" not in by_name and "Gadgets" not in by_name
    assert by_name["Wrapped"]["plugin"] == "wrapper"
    verbose, plugins = wrapper.seen[-1]
    assert verbose is True and "widgets" in plugins and "core" in plugins
    assert by_name["Wrapped"]["summary"] == f"{len(plugins)} answers"


async def test_a_wrapper_must_leave_answers(agent_factory):
    class Stray:
        @meshagent.hookimpl(wrapper=True)
        def meshagent_status(self):
            answers = yield
            return answers + [StatusSection("Raw", Health.OK, "no plugin named")]

    running = await agent_factory(extra_plugins=[("stray", Stray())])
    with pytest.raises(PluginError, match=r"meshagent_status: a wrapper \(plugin stray\) left"
                                          r" StatusSection\(name='Raw'"):
        running.agent.hooks.status(running.agent, False)


class WrapsNodes:
    """An old-style hookwrapper around an observer: advanced before and after the call."""

    def __init__(self):
        self.calls = []

    @meshagent.hookimpl(hookwrapper=True)
    def meshagent_node_changed(self, node):
        self.calls.append(("before", node.name))
        outcome = yield
        self.calls.append(("after", [(a.plugin, type(a.error).__name__)
                                     for a in outcome.get_result()]))


async def test_a_raising_observer_is_recorded_against_its_plugin(agent_factory, hook_recorder,
                                                                 caplog):
    wrapper = WrapsNodes()
    running = await agent_factory(extra_plugins=[("recorder", hook_recorder),
                                                 ("raising", RaisingObserver()),
                                                 ("wrapper", wrapper)])
    hook_recorder.calls.clear()
    wrapper.calls.clear()
    caplog.clear()
    errors_before = running.agent.hooks.errors
    node = Node("n", "c", 0)
    with caplog.at_level("ERROR", logger="meshagent.hooks.manager"):
        running.agent.hooks.node_changed(kind=ChangeKind.UPSERT, node=node)
    assert hook_recorder.of("node") == [(ChangeKind.UPSERT, node)]  # called after the raise
    assert running.agent.hooks.errors == errors_before + 1
    failed = [r for r in caplog.records if "failed in meshagent_node_changed" in r.getMessage()]
    assert [r.getMessage() for r in failed] == [
        "plugin raising failed in meshagent_node_changed"]
    assert "observer bug" in str(failed[0].exc_info[1])
    assert wrapper.calls == [("before", "n"), ("after", [("raising", "RuntimeError")])]


async def test_tryfirst_and_trylast_order_the_calls(agent_factory):
    order = []

    class First:
        @meshagent.hookimpl(tryfirst=True)
        def meshagent_node_changed(self):
            order.append("first")

    class Plain:
        @meshagent.hookimpl
        def meshagent_node_changed(self):
            order.append("plain")

    class Last:
        @meshagent.hookimpl(trylast=True)
        def meshagent_node_changed(self):
            order.append("last")

    # pluggy calls the last registered first: without the marks this would be plain, last, first
    running = await agent_factory(extra_plugins=[("first", First()), ("last", Last()),
                                                 ("plain", Plain())])
    order.clear()
    running.agent.hooks.node_changed(kind=ChangeKind.UPSERT, node=Node("n", "c", 0))
    assert order == ["first", "plain", "last"]


async def test_hook_calls_are_seen_by_pluggys_monitoring(agent_factory, hook_recorder):
    running = await agent_factory(extra_plugins=[("recorder", hook_recorder)])
    seen = []
    undo = running.agent.plugins.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: seen.append((name, [i.plugin_name for i in impls])),
        lambda outcome, name, impls, kwargs: None)
    try:
        running.agent.hooks.identity_changed(
            kind=ChangeKind.UPSERT, identity=Identity(6619392, frozenset({"k8s:app=x"})))
    finally:
        undo()
    calls = [plugins for name, plugins in seen if name == "meshagent_identity_changed"]
    assert len(calls) == 1 and "recorder" in calls[0]


class BatchObserver:
    def __init__(self):
        self.batches = []

    @meshagent.hookimpl
    def meshagent_ipcache_changes(self, changes):
        self.batches.append(list(changes))


async def test_ipcache_changes_reach_batch_and_single_change_observers_in_order(
        agent_factory, hook_recorder):
    batch = BatchObserver()
    running = await agent_factory(["--plugins", "memory"],
                                  extra_plugins=[("recorder", hook_recorder), ("batch", batch)])
    hook_recorder.calls.clear()
    batch.batches.clear()
    entries = [IPCacheEntry(ipaddress.ip_network(f"10.1.0.{i}/32"), 6619392, "cluster1")
               for i in range(10, 13)]
    changes = [(ChangeKind.UPSERT, e) for e in entries] + [(ChangeKind.DELETE, entries[0])]
    running.agent.hooks.ipcache_changes(changes)
    assert batch.batches == [changes]  # one call
    assert hook_recorder.of("ipcache") == changes  # each one, in order


async def test_a_listing_page_is_one_batch_of_ipcache_changes(agent_factory, hook_recorder):
    """The tables hold ipcache notices while a page is applied: one call for the page."""
    batch = BatchObserver()
    running = await agent_factory(["--plugins", "memory"],
                                  extra_plugins=[("recorder", hook_recorder), ("batch", batch)])
    batch.batches.clear()
    hook_recorder.calls.clear()
    ipcache = running.agent.tables.ipcache
    entries = [IPCacheEntry(ipaddress.ip_network(f"10.1.0.{i}/32"), 6619392, "cluster1")
               for i in range(20, 25)]
    with running.agent.tables.held():
        for entry in entries:
            ipcache.upsert(entry.prefix, entry)
        with running.agent.tables.held():  # nested: still held until the outermost ends
            ipcache.delete(entries[0].prefix)
        assert batch.batches == [] and hook_recorder.of("ipcache") == []
    expected = [(ChangeKind.UPSERT, e) for e in entries] + [(ChangeKind.DELETE, entries[0])]
    assert batch.batches == [expected]
    assert hook_recorder.of("ipcache") == expected
    ipcache.delete(entries[1].prefix)  # not held: at once
    assert batch.batches[-1] == [(ChangeKind.DELETE, entries[1])]
