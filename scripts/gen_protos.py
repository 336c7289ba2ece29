"""Generate the Python code for `proto/perito/v1/*.proto` into `client/perito/v1/`, and the
messages of the Open Inference Protocol (`proto/inference/grpc_service.proto`) into
`server/perito_server/_oip/`.

The generated modules are build output (git-ignored). `make proto`, `make install` and the
package build call this; `tests/unit/test_proto_fresh.py` fails when they are stale.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "client"
OIP_PROTO = PROTO_ROOT / "inference" / "grpc_service.proto"
OIP_OUT = ROOT / "server" / "perito_server" / "_oip"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "perito" / "v1").glob("*.proto"))


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files it wrote."""
    import grpc_tools
    from google.api import field_behavior_pb2
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # google/api/field_behavior.proto (`REQUIRED` fields), from googleapis-common-protos.
    googleapis = Path(field_behavior_pb2.__file__).parents[2]
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"-I{googleapis}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    package_dir = out_dir / "perito" / "v1"
    return sorted(p for p in package_dir.iterdir() if "_pb2" in p.name)


def generate_oip(out_dir: Path = OIP_OUT) -> list[Path]:
    """Generate the OIP messages (`grpc_service_pb2.py` / `.pyi`) into `out_dir`.

    Messages only: the server registers its handlers itself
    (`perito_server.doors.oip_grpc`), so no generated module imports another and the files can
    live inside the server package. They are for the server alone (the SDK ships no `inference`
    package), and live in a descriptor pool of their own (`_private_pool`).
    """
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            str(OIP_PROTO.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted((Path(scratch) / "inference").glob("*_pb2*")):
            target = out_dir / path.name
            text = path.read_text()
            if path.suffix == ".py":
                text = _private_pool(text)
            target.write_text(text)
            written.append(target)
    return written


def _private_pool(code: str) -> str:
    """`code` with its messages built in a descriptor pool of their own, not the default one.

    tritonclient.grpc (and any other client of the protocol) registers the same `inference.*`
    names in the default pool; two registrations of one name in a pool fail ("duplicate
    symbol"). In a pool of their own, Perito's copy and a client's coexist in one process
    (a test, a notebook, a service that calls Triton too).
    """
    default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
    if code.count(default) != 1:
        raise RuntimeError("protoc's output changed shape: update _private_pool")
    private = (
        "# Perito: a pool of its own (scripts/gen_protos.py, _private_pool).\n"
        "POOL = _descriptor_pool.DescriptorPool()\n"
        "DESCRIPTOR = POOL.AddSerializedFile("
    )
    return code.replace(default, private)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    written = generate(args.out)
    print(f"generated {len(written)} files from {len(proto_files())} protos")
    if args.out == DEFAULT_OUT:
        written = generate_oip()
        print(f"generated {len(written)} files from {OIP_PROTO.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
