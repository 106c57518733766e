"""Generate Python for Hubble's protos in core/observe/api (``make proto``).

The .proto files import each other as ``meshagent/observe/api/<pkg>/<pkg>.proto``, so protoc
runs over a copy laid out under ``meshagent/``: the generated modules then import each other as
``meshagent.observe.api...``, which is where they are installed. tests/test_hubble_protos.py
runs :func:`generate` into a temporary directory and compares, so the committed files always
match their .proto.
"""

import pathlib
import shutil
import sys
import tempfile

API = pathlib.Path(__file__).resolve().parent.parent / "core" / "observe" / "api"
PACKAGES = ("flow", "relay", "observer", "peer")
SERVICES = ("observer", "peer")  # the packages that define a gRPC service


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Write the generated modules to ``out/<pkg>/``; return their paths."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "src"
        gen = pathlib.Path(tmp) / "gen"
        gen.mkdir()
        protos = []
        for pkg in PACKAGES:
            target = src / "meshagent" / "observe" / "api" / pkg / f"{pkg}.proto"
            target.parent.mkdir(parents=True)
            shutil.copy(API / pkg / f"{pkg}.proto", target)
            protos.append(str(target.relative_to(src)))
        wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        args = ["protoc", f"-I{src}", f"-I{wkt}", f"--python_out={gen}", f"--pyi_out={gen}",
                f"--grpc_python_out={gen}", *protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for pkg in PACKAGES:
            (out / pkg).mkdir(parents=True, exist_ok=True)
            suffixes = ("_pb2.py", "_pb2.pyi") + (("_pb2_grpc.py",) if pkg in SERVICES else ())
            for suffix in suffixes:
                name = f"{pkg}{suffix}"
                shutil.copy(gen / "meshagent" / "observe" / "api" / pkg / name, out / pkg / name)
                written.append(out / pkg / name)
        return written


if __name__ == "__main__":
    for path in generate(API):
        print(path.relative_to(API.parent.parent.parent), file=sys.stderr)
