"""The generated gRPC code must match proto/: regenerate and compare."""

from __future__ import annotations

from pathlib import Path

from scripts.gen_protos import DEFAULT_OUT, generate


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc wrote nothing"
    for path in fresh:
        checked_in = DEFAULT_OUT / "perito" / "v1" / path.name
        assert checked_in.exists(), f"{checked_in} is missing: run `make proto`"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{checked_in} is stale: run `make proto`"
        )
    present = {p.name for p in (DEFAULT_OUT / "perito" / "v1").glob("*_pb2*")}
    assert present == {p.name for p in fresh}, "generated files without a proto: run `make proto`"
