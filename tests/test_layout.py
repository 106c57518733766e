"""The repository layout installs as the ``meshagent`` namespace and nothing else."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_directories_exist():
    for name in ("pyproject.toml", "core", "plugins", "bpf", "tests", "docs", "contrib"):
        assert (ROOT / name).exists(), name


def test_package_list_covers_every_package_dir():
    """pyproject lists packages by hand (core/ maps to meshagent): nothing may be left out."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, dotted in (("core", "meshagent"), ("plugins", "meshagent.plugins")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((dotted, *rel)))
    assert found == listed - {"meshagent.plugins.ebpf.bpf"}  # bpf/: C sources, no __init__


def test_wheel_has_no_top_level_core_or_plugins(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("meshagent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert "core" not in tops and "plugins" not in tops
    assert "meshagent/hooks/specs.py" in names
    assert not any(n.startswith(("meshagent_dev/", "meshagent/lab")) for n in names)
    assert "meshagent/plugins/memory/__init__.py" in names
    assert "meshagent/testing/kvstore_contract.py" in names
    assert "meshagent/plugins/ebpf/bpf/from_container.c" in names
    assert "meshagent/plugins/ebpf/bpf/lib/enforce.h" in names


def test_client_commands_import_only_the_client(tmp_path):
    """``meshagent status`` is run by people and scripts all day: it must not pay for the
    agent's imports (netlink, the HTTP server, metrics), nor for the plugin machinery, YAML or
    an HTTP client library (the client speaks HTTP/1.1 over the socket itself)."""
    script = (
        "import sys\n"
        "from meshagent import cli\n"
        f"cli.main(['status', '--socket-path', {str(tmp_path / 'none.sock')!r}])\n"
        "heavy = sorted(m for m in sys.modules if m == 'meshagent.daemon.agent' or m.split('.')[0] in"
        " ('pyroute2', 'aiohttp', 'prometheus_client', 'bcc', 'pluggy', 'yaml')"
        " or m in ('http.client', 'importlib.metadata'))\n"
        "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30)
    assert "no agent is running" in result.stderr
    assert result.stdout.strip() == "", f"imported by 'meshagent status': {result.stdout}"


CORE = Path(__file__).resolve().parent.parent / "core"
#: The dependency direction, lowest first: a module imports only from its own layer or below.
LAYERS = (
    ("foundation", ("", "errors", "events", "client", "model", "runtime", "kvstore.keys")),
    ("contracts", ("kvstore", "kvstore.contract", "identity", "identity.contract", "datapath",
                   "datapath.contract", "policy", "policy.contract", "policy.api")),
    ("components", ("kvstore.", "identity.", "datapath.", "policy.", "clustermesh", "endpoint",
                    "service")),
    ("plugin machinery", ("hooks", "plugin")),
    ("agent", ("daemon", "cli", "kvstoremesh")),  # the two processes' composition roots
)


def _layer(module: str) -> int:
    """The layer of a meshagent module (dotted, without ``meshagent.``): its most specific
    match, so ``kvstore.contract`` is a contract and ``kvstore.lock`` a component."""
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.endswith("."):
                hit = module.startswith(prefix)
            else:
                hit = module == prefix or (prefix and module.startswith(prefix + "."))
            if hit and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"meshagent.{module} is in no layer of tests/test_layout.py"
    return level


def _meshagent_imports(path: Path) -> set[str]:
    """Every meshagent module ``path`` imports, TYPE_CHECKING blocks and functions included."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("meshagent."):
            found.add(node.module.removeprefix("meshagent."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("meshagent.") for a in node.names
                      if a.name.startswith("meshagent.")}
    return found


def _core_modules() -> dict[str, Path]:
    return {".".join(p.relative_to(CORE).with_suffix("").parts).removesuffix("__init__")
            .removesuffix("."): p for p in CORE.rglob("*.py") if "testing" not in p.parts}


def test_dependencies_point_one_way():
    """values -> contracts -> components -> plugin machinery -> agent: never back up."""
    wrong = []
    for name, path in sorted(_core_modules().items()):
        for imported in sorted(_meshagent_imports(path)):
            if imported.startswith("plugins") or imported == "testing":
                continue
            if _layer(imported) > _layer(name):
                wrong.append(f"meshagent.{name} ({LAYERS[_layer(name)][0]}) imports"
                             f" meshagent.{imported} ({LAYERS[_layer(imported)][0]})")
    assert wrong == []


def test_nothing_below_the_agent_imports_it():
    importers = {name for name, path in _core_modules().items()
                 if name not in ("daemon.agent", "cli") and "daemon.agent" in _meshagent_imports(path)}
    assert importers == set()


def test_plugins_and_contrib_do_not_import_the_agent():
    importers = [str(p.relative_to(ROOT)) for top in ("plugins", "contrib") for p in
                 (ROOT / top).rglob("*.py") if "daemon.agent" in _meshagent_imports(p)]
    assert importers == []


def test_contrib_plugins_use_only_the_public_module():
    """contrib/ shows a plugin author the way: everything from ``meshagent.plugin`` (and
    ``meshagent.client`` for a command that talks to the agent)."""
    for path in sorted((ROOT / "contrib").glob("*/meshagent_*/*.py")):
        assert _meshagent_imports(path) <= {"plugin", "client"}, path


def test_every_slot_contract_is_in_the_public_module():
    import meshagent.plugin
    from meshagent.hooks.slots import SLOTS
    for slot in SLOTS:
        assert getattr(meshagent.plugin, slot.protocol.__qualname__) is slot.protocol
    assert set(meshagent.plugin.__all__) <= set(vars(meshagent.plugin))
