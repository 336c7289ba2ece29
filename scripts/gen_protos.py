"""Generate the Python code for `proto/perito/v1/*.proto` into `client/perito/v1/`.

The generated modules are build output (git-ignored). `make proto`, `make install` and the
package build call this; `tests/unit/test_proto_fresh.py` fails when they are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "client"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "perito" / "v1").glob("*.proto"))


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files it wrote."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    package_dir = out_dir / "perito" / "v1"
    return sorted(p for p in package_dir.iterdir() if "_pb2" in p.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    written = generate(parser.parse_args().out)
    print(f"generated {len(written)} files from {len(proto_files())} protos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
