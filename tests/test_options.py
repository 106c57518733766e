"""Options: flags > MESHAGENT_* environment > --config-dir files > defaults; clear errors."""

import pytest
from conftest import run_cli

from meshagent.cli import build_agent
from meshagent.errors import PluginError, UsageError
from meshagent.runtime.config import add_core_options
from meshagent.runtime.options import Parser, parse_bool, read_config_dir


def core_parser() -> Parser:
    parser = Parser()
    add_core_options(parser)
    return parser


@pytest.fixture
def config_dir(tmp_path):
    d = tmp_path / "config-map"
    d.mkdir()
    (d / "cluster-name").write_text("from-dir\n")
    (d / "cluster-id").write_text("7")
    (d / "node-name").write_text("node-from-dir")
    (d / "debug").write_text("true")
    return d


def test_precedence_flag_env_configdir_default(config_dir):
    parsed = core_parser().parse(
        ["--config-dir", str(config_dir), "--cluster-name", "from-flag"],
        {"MESHAGENT_CLUSTER_NAME": "from-env", "MESHAGENT_CLUSTER_ID": "9"},
    )
    assert parsed.values["cluster-name"] == "from-flag"  # flag beats env and dir
    assert parsed.values["cluster-id"] == 9  # env beats dir
    assert parsed.values["node-name"] == "node-from-dir"  # dir beats default
    assert parsed.values["debug"] is True
    assert parsed.values["log-format"] == "text"  # default
    assert parsed.sources["cluster-name"] == "flag"
    assert parsed.sources["cluster-id"] == "env MESHAGENT_CLUSTER_ID"
    assert parsed.sources["node-name"] == f"config-dir {config_dir / 'node-name'}"
    assert parsed.sources["log-format"] == "default"


def test_config_dir_itself_from_env(config_dir):
    parsed = core_parser().parse([], {"MESHAGENT_CONFIG_DIR": str(config_dir)})
    assert parsed.values["cluster-name"] == "from-dir"


def test_config_dir_skips_configmap_internals_and_reports_unknown_files(config_dir):
    (config_dir / "..data").symlink_to(config_dir)
    (config_dir / "..2026_11_26_00_00_00.123").mkdir()
    (config_dir / "some-other-component-key").write_text("x")
    assert "..data" not in read_config_dir(config_dir)
    parsed = core_parser().parse(["--config-dir", str(config_dir)], {})
    assert parsed.unknown_config_files == ("some-other-component-key",)


def test_config_dir_must_be_a_directory(tmp_path):
    with pytest.raises(UsageError, match="--config-dir=.*not a directory"):
        core_parser().parse(["--config-dir", str(tmp_path / "nope")], {})


@pytest.mark.parametrize("source", ["env", "dir"])
def test_bad_value_names_option_value_and_source(source, tmp_path):
    environ, args = {}, []
    if source == "env":
        environ["MESHAGENT_CLUSTER_ID"] = "abc"
    else:
        (tmp_path / "cluster-id").write_text("abc")
        args = ["--config-dir", str(tmp_path)]
    with pytest.raises(UsageError) as info:
        core_parser().parse(args, environ)
    message = str(info.value)
    assert "--cluster-id='abc'" in message and "integer" in message
    assert ("MESHAGENT_CLUSTER_ID" if source == "env" else str(tmp_path / "cluster-id")) in message


def test_bad_flag_is_a_usage_error():
    with pytest.raises(UsageError, match="--cluster-id: invalid int value: 'x'"):
        core_parser().parse(["--cluster-id", "x"], {})
    with pytest.raises(UsageError, match="unrecognized arguments: --no-such-flag"):
        core_parser().parse(["--no-such-flag"], {})


def test_choices_checked_for_every_source():
    with pytest.raises(UsageError, match=r"--log-format='xml' \(from env MESHAGENT_LOG_FORMAT\)"):
        core_parser().parse([], {"MESHAGENT_LOG_FORMAT": "xml"})


def test_bool_forms():
    parser = core_parser()
    assert parser.parse(["--debug"], {}).values["debug"] is True
    assert parser.parse(["--debug=false"], {}).values["debug"] is False
    assert parse_bool("Yes") is True and parse_bool("0") is False
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_plugin_options_need_their_prefix():
    parser = core_parser()
    group = parser.getgroup("etcd")
    group.addoption("etcd-config", help="x")
    with pytest.raises(PluginError, match="option --config must start with --etcd-"):
        group.addoption("config", help="x")
    with pytest.raises(PluginError, match="added by both 'etcd' and 'etcd'"):
        group.addoption("etcd-config", help="x")


def test_plugin_option_from_env_and_config_dir(tmp_path):
    (tmp_path / "memory-store").write_text("from-dir")
    agent = build_agent(["--plugins", "memory", "--config-dir", str(tmp_path)], {})
    assert agent.config.get("memory-store") == "from-dir"
    agent = build_agent(["--plugins", "memory", "--config-dir", str(tmp_path)],
                        {"MESHAGENT_MEMORY_STORE": "from-env"})
    assert agent.config.get("memory-store") == "from-env"
    assert agent.config.sources["memory-store"] == "env MESHAGENT_MEMORY_STORE"


def test_plugins_option_itself_from_config_dir(tmp_path):
    (tmp_path / "plugins").write_text("memory")
    agent = build_agent(["--config-dir", str(tmp_path)], {})
    assert agent.config.plugins == ("memory",)


@pytest.mark.parametrize("args, expected", [
    (["--cluster-id", "300"], "invalid --cluster-id=300: must be 0 (not in a mesh) or 1..255"),
    (["--cluster-name", "Bad_Name", "--cluster-id", "1"], "invalid --cluster-name='Bad_Name'"),
    (["--cluster-id", "5"], "invalid --cluster-name='default': a cluster in a mesh"),
    (["--max-connected-clusters", "100"], "invalid --max-connected-clusters=100"),
])
def test_cli_validation_exits_2_with_the_rule(args, expected, short_tmp):
    result = run_cli("--plugins", "memory", "--state-dir", str(short_tmp / "state"),
                     "--socket-path", str(short_tmp / "s.sock"), *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert not (short_tmp / "state").exists() and not (short_tmp / "s.sock").exists()


def test_help_lists_options_with_env_names():
    result = run_cli("--plugins", "memory", "--help")
    assert result.returncode == 0
    assert "--cluster-id" in result.stdout and "MESHAGENT_CLUSTER_ID" in result.stdout
    assert "--memory-store" in result.stdout  # the plugin's group is shown
    assert "commands" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["--clustermesh-config", "/nonexistent"], "invalid --clustermesh-config='/nonexistent'"),
    (["--clustermesh-config", "/tmp"], "--clustermesh-config needs a --cluster-id"),
    (["--kvstore-lease-ttl", "0"], "invalid --kvstore-lease-ttl=0.0"),
    (["--pod-cidr", "10.1.0.0/33"], "--pod-cidr"),
    (["--node-ip", "10.1.1"], "--node-ip"),
])
def test_clustermesh_and_node_options_are_validated(args, expected):
    with pytest.raises(UsageError, match=expected.replace("(", r"\(")):
        build_agent(["--plugins", "memory", *args], {})


def test_etcd_plugin_needs_its_config_file(tmp_path):
    with pytest.raises(UsageError, match="--etcd-config is required by the etcd kvstore"):
        build_agent(["--plugins", "etcd"], {})
    with pytest.raises(UsageError, match=f"etcd config {tmp_path / 'missing'}"):
        build_agent(["--plugins", "etcd", "--etcd-config", str(tmp_path / "missing")], {})
