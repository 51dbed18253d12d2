"""Generates agentmesh's protobuf and gRPC modules (with .pyi type stubs) from the repository's
`proto/` into `src/` — run by the build (setup.py) and by `python codegen.py`. The generated
modules (`agentmesh/<service>/v1/*_pb2*.py[i]`) are never edited or committed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"


def proto_root() -> Path:
    """The `proto/` directory: the repository's, or a copy shipped in an sdist."""
    for candidate in (HERE.parent.parent / "proto", HERE / "proto"):
        if (candidate / "agentmesh").is_dir():
            return candidate
    raise SystemExit("agentmesh's proto/ directory not found (build from the repository)")


def generate() -> list[Path]:
    """Generates every module; returns the .proto files it read."""
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root()
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    protos = sorted(root.glob("agentmesh/*/v1/*.proto"))
    args = [
        "protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={SRC}",
        f"--pyi_out={SRC}",
        f"--grpc_python_out={SRC}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Packages for the generated modules (the service packages above them are ours).
    for proto in protos:
        package = SRC / proto.relative_to(root).parent
        for directory in (package, package.parent):
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from proto/ by codegen.py."""\n')
    return protos


if __name__ == "__main__":
    os.chdir(HERE)
    for p in generate():
        print(p.relative_to(proto_root()), file=sys.stderr)
