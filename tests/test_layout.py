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
    ("foundation", ("", "errors", "events", "client", "model", "runtime", "kvstore.keys",
                    "observe.api", "observe.jsonformat")),
    ("contracts", ("kvstore", "kvstore.contract", "identity", "identity.contract", "datapath",
                   "datapath.contract", "policy", "policy.contract", "policy.api", "fqdn",
                   "fqdn.contract", "fqdn.matchpattern")),
    # what components build on: following, batching, locking, probing a kvstore
    ("kvstore helpers", ("kvstore.",)),
    ("components", ("kvstore.local", "kvstore.publisher", "identity.", "datapath.", "policy.",
                    "fqdn.", "clustermesh", "endpoint", "service", "observe")),
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


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (its strongly connected parts of more than one)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            part = []
            while (top := stack.pop()) != node:
                part.append(top)
            if part:
                found.append(sorted([node, *part]))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _all_modules() -> dict[str, Path]:
    """Every module of the meshagent namespace in the tree (core, built-in plugins)."""
    modules = {f"meshagent.{name}".rstrip("."): path for name, path in _core_modules().items()}
    for path in (ROOT / "plugins").rglob("*.py"):
        parts = path.relative_to(ROOT / "plugins").with_suffix("").parts
        modules[".".join(("meshagent.plugins", *parts)).removesuffix(".__init__")] = path
    return modules


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports: ``from package import submodule``
    names the submodule, not the package."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & modules


def test_no_import_cycles():
    """No module imports, however indirectly, one that imports it back (lazy imports in
    functions included): every dependency has a direction."""
    modules = _all_modules()
    graph = {name: _module_imports(path, set(modules)) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_process_roots_share_code_only_through_modules_below_them():
    """The agent (daemon, cli) and KVStoreMesh (kvstoremesh) never import each other."""
    wrong = []
    for name, path in _core_modules().items():
        root = name.split(".")[0]
        for imported in _meshagent_imports(path):
            other = imported.split(".")[0]
            if root in ("daemon", "cli") and other == "kvstoremesh" and name != "cli":
                wrong.append(f"{name} imports {imported}")
            if root == "kvstoremesh" and other in ("daemon", "cli"):
                wrong.append(f"{name} imports {imported}")
    assert wrong == []


def test_nothing_below_the_agent_imports_it():
    importers = {name for name, path in _core_modules().items()
                 if name not in ("daemon.agent", "cli") and "daemon.agent" in _meshagent_imports(path)}
    assert importers == set()


def test_plugins_and_contrib_do_not_import_the_agent():
    importers = [str(p.relative_to(ROOT)) for top in ("plugins", "contrib") for p in
                 (ROOT / top).rglob("*.py") if "daemon.agent" in _meshagent_imports(p)]
    assert importers == []


def test_built_in_plugins_use_only_the_public_module():
    """Built-in plugins are written as any third-party one is: from ``meshagent.plugin`` (and
    ``meshagent.client`` for a command), besides their own modules."""
    wrong = []
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        own = {i for i in _meshagent_imports(path) if i.startswith("plugins.")}
        if extra := _meshagent_imports(path) - own - {"plugin", "client"}:
            wrong.append(f"{path.relative_to(ROOT)}: {', '.join(sorted(extra))}")
    assert wrong == []


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
