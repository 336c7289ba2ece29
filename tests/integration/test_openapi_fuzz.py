"""schemathesis over `GET /openapi.json` of a real `perito serve --http-port`, with every
check on, on a server with tenants (a bearer token) and on one without (anonymous): no 5xx,
every answer's status, content type, headers and body as documented, OPTIONS and 405 naming
exactly the documented methods, the token asked for exactly where the server needs one,
schema-violating requests refused. Bounded (a few examples per operation, a fixed seed, no
deadline) to stay under a minute on two cores."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tiny_registry
from tests.helpers import VENV_BIN, perito_serve_with_http

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token"
# Half the model names are the served model's, so requests get past NOT_FOUND to the model.
# A page token is opaque: one made up is rightly refused, so none is generated.
# Every check but positive_data_acceptance (a request that fits the document is not refused
# 400): some of the server's rules are not JSON Schema ones: Classify takes `content`, not
# `uri`, in the Image message it shares with jobs; a job's input oneof holds exactly one
# member; an OIP input's data must fit its shape and be an image; OIP's model ready answers
# 400 for not ready, as the protocol says.
CONFIG = """
[dictionaries.models]
values = ["tiny", "tiny@production"]

[parameters]
"path.model" = { dictionary = "models", probability = 0.5 }
"query.page_token" = ""
"""


@pytest.mark.parametrize("tenants", [True, False], ids=["tenants", "anonymous"])
def test_schemathesis_with_every_check_finds_nothing(
    tmp_path: Path, tiny_model_file: Path, redis_url: str, tenants: bool
) -> None:
    tiny_registry(tmp_path / "registry", tiny_model_file, aliases=("production",))
    (tmp_path / "results").mkdir()
    auth = {"PERITO_AUTH_TOKENS": json.dumps([TOKEN])} if tenants else {}
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    with perito_serve_with_http(
        tmp_path,
        PERITO_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/8",
        PERITO_RESULTS_URI=str(tmp_path / "results"),
        PERITO_LOCAL_ROOTS=json.dumps([str(tmp_path / "results")]),
        **auth,
    ) as serve:
        completed = subprocess.run(
            [
                str(VENV_BIN / "schemathesis"), "--config-file", str(config),
                "run", f"http://{serve.http_url}/openapi.json", "--checks", "all",
                "--exclude-checks", "positive_data_acceptance",
                "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "8",
                "--seed", "18", "--generation-deterministic", "--request-timeout", "30",
                "--suppress-health-check", "all", "--workers", "1",
                *(["--header", f"Authorization: Bearer {TOKEN}"] if tenants else []),
            ],
            capture_output=True, text=True, timeout=240, check=False,
            cwd=tmp_path,  # its caches (.schemathesis/) stay out of the checkout
        )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-8000:] + completed.stderr[-2000:]
    assert "No issues found" in completed.stdout or " passed" in completed.stdout
