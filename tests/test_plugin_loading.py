"""Selecting, blocking, loading and listing plugins, and filling provider slots."""

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import clean_env, run_cli

import meshagent
from meshagent.cli import build_agent
from meshagent.errors import PluginError


def test_unknown_plugin_exits_2_and_lists_available(short_tmp):
    result = run_cli("--plugins", "memory,nosuch", "--state-dir", str(short_tmp / "state"),
                     "--socket-path", str(short_tmp / "s.sock"))
    assert result.returncode == 2
    assert "'nosuch'" in result.stderr
    assert "memory (builtin)" in result.stderr and "audit (meshagent-audit 0.3.1)" in result.stderr
    assert not (short_tmp / "state").exists()  # no side effect


def _imported_after_loading(selected: list[str]) -> bool:
    code = textwrap.dedent(f"""
        import sys
        from meshagent.hooks.manager import PluginManager
        PluginManager({selected!r})
        print("meshagent_audit" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_unselected_plugins_are_blocked_before_import():
    assert _imported_after_loading(["memory"]) is False
    assert _imported_after_loading(["memory", "audit"]) is True


def _fake_distribution(root, dist: str, plugin: str, module: str, body: str = ""):
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[meshagent.plugins]\n{plugin} = {module}\n")
    (root / f"{module}.py").write_text(body)


def test_two_distributions_claiming_one_name_is_an_error(tmp_path):
    _fake_distribution(tmp_path, "evil-memory", "memory", "evil_memory")
    result = run_cli("--plugins", "memory", env=clean_env(PYTHONPATH=str(tmp_path)))
    assert result.returncode == 2
    assert "'memory' is claimed by two distributions" in result.stderr
    assert "builtin" in result.stderr and "evil-memory 1.0" in result.stderr


def test_plugin_failing_to_import_is_named(tmp_path):
    _fake_distribution(tmp_path, "broken-plugin", "broken", "broken_plugin",
                       "raise ImportError('needs libfoo')\n")
    result = run_cli("--plugins", "memory,broken", env=clean_env(PYTHONPATH=str(tmp_path)))
    assert result.returncode == 2
    assert "plugin 'broken' (broken-plugin 1.0) failed to import: ImportError: needs libfoo" \
        in result.stderr


def test_empty_required_slot_names_slot_and_candidates():
    result = run_cli("--plugins", "audit")
    assert result.returncode == 2
    assert "slot 'kvstore' is empty" in result.stderr
    assert ("plugins that could fill it: consul (consul), etcd (etcd), memory (memory)"
            in result.stderr)


def test_unknown_provider_choice_is_an_error():
    with pytest.raises(PluginError, match=r"--kvstore=etcd: no loaded plugin offers it.*memory"):
        build_agent(["--plugins", "memory", "--kvstore", "etcd"], {})


class SecondStore:
    @meshagent.hookimpl
    def meshagent_register_kvstore(self, registry):
        registry.register("other", lambda agent: None)


class ClashingStore:
    @meshagent.hookimpl
    def meshagent_register_kvstore(self, registry):
        registry.register("memory", lambda agent: None)


def test_several_providers_need_a_choice():
    with pytest.raises(PluginError, match=r"several providers \(memory \(plugin memory\), other"
                                          r" \(plugin second\)\): choose one with --kvstore"):
        build_agent(["--plugins", "memory"], {}, [("second", SecondStore())])
    agent = build_agent(["--plugins", "memory", "--kvstore", "memory"], {},
                        [("second", SecondStore())])
    assert agent.providers["kvstore"].plugin == "memory"


def test_duplicate_provider_name_names_both_plugins():
    with pytest.raises(PluginError, match="'memory' is registered by both plugin 'clash' and"
                                          " plugin 'memory'"):
        build_agent(["--plugins", "memory"], {}, [("clash", ClashingStore())])


def test_empty_datapath_slot_is_fine():
    agent = build_agent(["--plugins", "memory"], {})
    assert agent.providers["datapath"] is None


def test_plugins_listing_without_agent_shows_contrib_distribution(short_tmp):
    result = run_cli("plugins", "-o", "json", "--socket-path", str(short_tmp / "none.sock"))
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["audit"]["distribution"] == "meshagent-audit"
    assert rows["audit"]["version"] == "0.3.1"
    assert rows["audit"]["origin"] == "meshagent-audit 0.3.1"
    assert rows["memory"]["origin"] == "builtin"
    assert rows["memory"]["provides"] == {"kvstore": ["memory"]}
    assert "meshagent_register_kvstore" in rows["memory"]["hooks"]
    assert {row["status"] for row in rows.values()} == {"available"}


def test_plugins_listing_for_an_allow_list():
    result = run_cli("plugins", "--plugins", "memory")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[2:]}
    assert lines == {"audit": "blocked", "consul": "blocked", "ebpf": "blocked",
                     "etcd": "blocked", "guardrails": "blocked", "k8s": "blocked",
                     "memory": "active", "nftables": "blocked"}


MISSPELLED = """\
import meshagent

@meshagent.hookimpl
def meshagent_ipcache_change(kind, entry):  # sic: meshagent_ipcache_changed
    pass
"""


def test_an_installed_plugin_with_a_misspelled_hook_is_refused(tmp_path, short_tmp):
    _fake_distribution(tmp_path, "typo-plugin", "typo", "typo_plugin", MISSPELLED)
    env = clean_env(PYTHONPATH=str(tmp_path))
    result = run_cli("--plugins", "memory,typo", "--state-dir", str(short_tmp / "state"),
                     "--socket-path", str(short_tmp / "s.sock"), env=env)
    assert result.returncode == 2
    assert ("plugin 'typo' implements unknown hook meshagent_ipcache_change: no meshagent hook"
            " has that name (did you mean meshagent_ipcache_changes or"
            " meshagent_ipcache_changed?)") in result.stderr
    assert not (short_tmp / "state").exists()  # no side effect
    kvstoremesh = run_cli("kvstoremesh", "--plugins", "memory,typo", "--cluster-name", "c1",
                          "--cluster-id", "1", "--clustermesh-config", str(short_tmp),
                          "--kvstoremesh-socket-path", str(short_tmp / "kvm.sock"), env=env)
    assert kvstoremesh.returncode == 2
    assert "plugin 'typo' implements unknown hook meshagent_ipcache_change" in kvstoremesh.stderr
    # the listing shows it without an agent, and says what an agent would do
    listing = run_cli("plugins", "--plugins", "memory,typo", env=env)
    assert listing.returncode == 0, listing.stderr
    assert ("# plugin 'typo' implements unknown hooks meshagent_ipcache_change: an agent"
            " refuses to start with it") in listing.stdout
    rows = {r["name"]: r for r in json.loads(run_cli("plugins", "-o", "json", "--socket-path",
                                                     str(short_tmp / "none.sock"),
                                                     env=env).stdout)}
    assert rows["typo"]["unknown_hooks"] == ["meshagent_ipcache_change"]
    assert rows["memory"]["unknown_hooks"] == []
