"""Rolling out a new model on the demo's registry: what `make demo-rollout` runs, and what
docs/rollouts.md quotes.

1. Start redis-server, a worker and a server over the demo's registry (`make demo` publishes
   ImageNet EfficientNet-Lite0 as version 1, alias `production`; done here too if missing).
2. Publish a candidate, version 2: the same network served at 192 px instead of 224 (a
   cheaper input a team might try), imported with `--calibration`, so its card carries the
   drift reference.
3. Shadow version 2 on all of production's traffic; send the demo's photos and framings;
   `perito models compare` the two versions live, then offline through two bulk jobs.
4. Split production: 30% of its requests to version 2, sticky per routing key (a claim id).
5. Promote version 2; then watch drift: its own kind of photos, then darkened ones.
6. The audit log of every change; stop everything.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from demo import (
    BIN,
    MODEL,
    ROOT,
    Service,
    free_port,
    make_tenants,
    publish_model,
    step,
    write_calibration,
)
from PIL import Image

import perito

CANDIDATE_SIZE = 192


def run(*args: str, env: dict[str, str], check: bool = True) -> str:
    """Run a `perito` command, echoing it and its output."""
    print("$ " + " ".join(shlex.quote(a) if " " in a else a for a in args), flush=True)
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    # Progress goes to stderr as it happens, before the answer on stdout.
    print((done.stderr + done.stdout).rstrip(), flush=True)
    if check and done.returncode != 0:
        raise SystemExit(f"{args[1:3]} exited {done.returncode}")
    return done.stdout


def publish_candidate(perito_cli: str, work: Path, env: dict[str, str]) -> None:
    """Version 2: the same model.pt at 192 px (resized to 219, so the crop keeps 224/256)."""
    if (work / "registry" / "models" / MODEL / "2" / "manifest.json").exists():
        print(f"{MODEL} version 2 is already published")
        return
    build = work / "build" / "lite0"
    if not (build / "model.pt").exists():
        run(perito_cli, "export-pretrained", "efficientnet-lite0", "--out", str(build), env=env)
    run(
        perito_cli,
        "models",
        "import",
        str(build / "model.pt"),
        "--labels",
        str(build / "labels.txt"),
        "--name",
        MODEL,
        "--input-size",
        str(CANDIDATE_SIZE),
        "--resize-size",
        str(round(CANDIDATE_SIZE * 256 / 224)),
        "--interpolation",
        "bicubic",
        "--calibration",
        str(work / "build" / "calibration"),
        "--description",
        f"ImageNet EfficientNet-Lite0 at {CANDIDATE_SIZE} px",
        env=env,
    )


def photos(work: Path, env: dict[str, str]) -> list[Path]:
    """The demo's photos and the framings of real pictures it calibrated with (made here
    when `make demo` has not run)."""
    if not any((work / "photos").glob("*.jpg")):
        script = str(ROOT / "scripts" / "sample_photos.py")
        run(str(BIN / "python"), script, "--out", str(work / "photos"), env=env)
    calibration = write_calibration(work / "build" / "calibration")
    # Its calibration/ and held-out/ halves: the framings of real pictures and the scenes.
    return sorted((work / "photos").glob("*.jpg")) + sorted(calibration.rglob("*.jpg"))


def darkened(paths: list[Path]) -> list[bytes]:
    """The same photos at a fifth of their brightness (a camera with a failing exposure)."""
    out = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) * 0.2
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def wait_refresh(seconds: float) -> None:
    print(f"(waiting {seconds:g} s: one alias refresh)", flush=True)
    time.sleep(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var")
    work: Path = parser.parse_args().workdir.resolve()
    perito_cli = str(BIN / "perito")
    redis_port, port = free_port(), free_port()
    work.mkdir(parents=True, exist_ok=True)
    tenants_file, tokens = make_tenants(work)
    from perito_core.access.tenancy import add_tenant

    admin = add_tenant(tenants_file, "operator", roles=["admin"], models=["*"])
    ttl = 2.0
    env = {
        **os.environ,
        "PERITO_REGISTRY": str(work / "registry"),
        "PERITO_CACHE_DIR": str(work / "cache"),
        "PERITO_SERVER": f"127.0.0.1:{port}",
        "PERITO_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PERITO_LOCAL_ROOTS": json.dumps([str(work)]),
        "PERITO_RESULTS_URI": str(work / "results"),
        "PERITO_TENANTS_FILE": str(tenants_file),
        "PERITO_TOKEN": tokens["inspector"],
        "PERITO_ALIAS_TTL_S": str(ttl),
        "PERITO_DRIFT_INTERVAL_S": "1",
    }
    redis_args = f"--port {redis_port} --bind 127.0.0.1 --save '' --appendonly no"
    processes = {
        "redis-server": Service(
            "redis-server",
            ["redis-server", *shlex.split(redis_args)],
            env,
            work / "redis.log",
            "Ready to accept",
        ),
        "worker": Service(
            "perito worker", [perito_cli, "worker"], env, work / "worker.log", " ready."
        ),
        "server": Service(
            "perito serve",
            [perito_cli, "serve", "--port", str(port), "--preload", f"{MODEL}@production"],
            env,
            work / "serve-rollout.log",
            "perito: serving on",
        ),
    }
    images = photos(work, env)
    try:
        processes["redis-server"].launch()
        processes["redis-server"].wait_ready(60)
        step("version 1 serves production (make demo publishes it)")
        publish_model(perito_cli, work, work / "registry", env)
        run(perito_cli, "models", "alias", MODEL, "production", "1", env=env)
        run(perito_cli, "models", "shadow", MODEL, "--of", "production", "--stop", env=env)

        step(f"a candidate: version 2, the same network at {CANDIDATE_SIZE} px")
        publish_candidate(perito_cli, work, env)

        step("starting redis-server, a worker and the server")
        for name in ("worker", "server"):
            processes[name].launch()
        for name in ("worker", "server"):
            processes[name].wait_ready(180)

        step("shadow: version 2 runs on all of production's traffic, never answers it")
        run(
            perito_cli,
            "models",
            "shadow",
            MODEL,
            "2",
            "--of",
            "production",
            "--sample",
            "1",
            env=env,
        )
        wait_refresh(ttl + 1)
        with perito.Client(f"127.0.0.1:{port}", token=tokens["inspector"], timeout=120) as client:
            answered = client.classify(images, model=f"{MODEL}@production", top_k=1)
            versions = Counter(result.model_version for result in answered)
            print(f"{len(answered)} photos classified; answered by version {dict(versions)}")
            time.sleep(3)  # the shadow's queue drains, its counts reach Redis
            run(perito_cli, "models", "compare", MODEL, "production", "2", env=env)
            run(
                perito_cli,
                "models",
                "compare",
                MODEL,
                "1",
                "2",
                "--plot",
                str(work / "compare-1-2.png"),
                env=env,
            )

            step("the same comparison offline: one bulk job per version over a folder")
            # In the folder the inspector may read: the framings, copied.
            framings = work / "inspection" / "framings"
            framings.mkdir(parents=True, exist_ok=True)
            for path in (work / "build" / "calibration").rglob("*.jpg"):
                (framings / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
            run(
                perito_cli,
                "models",
                "compare",
                MODEL,
                "1",
                "2",
                "--images",
                str(framings),
                env=env,
            )

            step("canary: 30% of production's requests to version 2, sticky per claim id")
            run(perito_cli, "models", "shadow", MODEL, "--of", "production", "--stop", env=env)
            run(
                perito_cli,
                "models",
                "alias",
                MODEL,
                "production",
                "2",
                "--canary",
                "30",
                env=env,
            )
            wait_refresh(ttl + 1)
            # Each claim its own photo: a window of one photo sent 300 times is drift too.
            by_claim = {}
            for claim in range(300):
                [result] = client.classify(
                    images[claim % len(images) : claim % len(images) + 1],
                    model=f"{MODEL}@production",
                    top_k=1,
                    routing_key=f"claim-{claim}",
                )
                by_claim[f"claim-{claim}"] = result.model_version
            shares = Counter(by_claim.values())
            print(f"300 claims: {dict(sorted(shares.items()))} (version 2: {shares['2'] / 3:.1f}%)")
            again = {
                claim: client.classify(
                    images[:1], model=f"{MODEL}@production", top_k=1, routing_key=claim
                )[0].model_version
                for claim in list(by_claim)[:20]
            }
            same = sum(again[claim] == by_claim[claim] for claim in again)
            print(f"the first 20 claims again: {same} of 20 answered by the same version")

            step("promote: production is version 2 on every server within one refresh")
            run(perito_cli, "models", "alias", MODEL, "production", "--promote", env=env)
            wait_refresh(ttl + 1)
            answered = client.classify(images, model=f"{MODEL}@production", top_k=1)
            versions = Counter(result.model_version for result in answered)
            print(f"{len(answered)} photos classified; answered by version {dict(versions)}")
            run(perito_cli, "models", "show", MODEL, env=env)

            step("drift: version 2's live traffic against its card's reference")
            time.sleep(2)
            run(perito_cli, "models", "drift", MODEL, "--version", "production", env=env)
            print("now the same photos, darkened to a fifth (a failing exposure):")
            dark = darkened(images)
            for start in range(0, len(dark), 16):
                client.classify(dark[start : start + 16], model=f"{MODEL}@production", top_k=1)
            time.sleep(2)
            run(perito_cli, "models", "drift", MODEL, "--version", "production", env=env)

        step("every change, in the audit log")
        run(
            perito_cli,
            "audit",
            "--since",
            "1",
            "--limit",
            "12",
            env={**env, "PERITO_TOKEN": admin},
        )
    finally:
        step("stopping the server, the worker and redis-server")
        codes = {name: processes[name].stop(60) for name in ("server", "worker", "redis-server")}
    if codes["server"] != 0:
        print(f"server exited with {codes['server']}", file=sys.stderr)
        return 1
    print("\nrollout demo finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
