"""The fault suite's `cut-off-host` scenario: a worker host cut off the network mid-chunk.

Two worker hosts are simulated with Linux network namespaces (`ip netns`, as in
ip-netns(8)): each is joined to the root namespace by a veth pair on a /30 of 10.231.0.0/16
that exists only on this machine (the root end 10.231.N.1, the host's end 10.231.N.2, N one
no interface uses), and runs one `perito worker` (`ip netns exec`) with the environment
`Stack` gives workers, its job store and broker at `redis://10.231.N.1:PORT/0`. redis-server,
`perito serve` and the local folder of images and results stay in the root namespace (the
folder is the hosts' shared storage). Namespaces and links are named after the run's process
id, so runs side by side keep apart; a run removes them as it ends, and the next run removes
those of runs whose process is gone. Host A's link is cut by setting the root end of its veth
down: a silent cut, no reset, as when a host drops off the network; packets in either
direction vanish (tc's `netem loss 100%` would do the same, where the kernel has sch_netem).

What it does: host B's worker is stopped (SIGSTOP) while a 4,000-image job (chunks of 1,000)
is submitted, so that host A's worker, 3 processes (`PERITO_CONCURRENCY`), takes chunks 0-2,
one each. Once they have read a quarter of their images (the bytes its processes read, from
/proc/PID/io: how far a chunk has got is not told outside a worker, whose results may be
recorded only as the chunk ends), A's link is cut and B resumed. B runs chunk 3; A's leases
lapse (`PERITO_LEASE_TTL_S`, 3 s) and the server's watchdog (`PERITO_WATCHDOG_INTERVAL_S`,
1 s; two sweeps) resends chunks 0-2, which B runs in turn. A's link is restored as soon as B
has finished the first of them, so A comes back holding three chunks with three fates: one B
finished (A's results for it must be refused or change nothing), one B is running (A's
writes race B's), one still queued (unless B reaches it first, A's lease is still its own: A
renews it and goes on, and the resent delivery is skipped). Expected: the job succeeds with
every item exactly once (`check_job`), all three chunks resent, at least one of A's chunk
tasks skipped after its return. Printed: the time from the cut to the resend, to A's return
and to the job's end, and how A's chunk tasks ended after its return (its
`perito_worker_chunks_total`, read inside its namespace: done, skipped with its results not
recorded, or duplicate deliveries).

Skipped (marked SKIP), not failed, where namespaces cannot be made: not root, no `ip`
(`make system-deps` installs iproute2), or a kernel or container that refuses them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import perito
from bench.faults import (
    Config,
    Failure,
    Lab,
    Outcome,
    Sampler,
    Skipped,
    Stack,
    _stat,
    check_job,
    check_store,
    wait_terminal,
)
from perito_core.jobs.store import job_key

CHUNK = 1000  # items per chunk
CHUNKS = 4
A_PROCESSES = 3  # host A's worker processes (PERITO_CONCURRENCY): each holds a chunk at the cut
METRICS_PORT = 9501  # each worker's /metrics, the same port in each namespace
# kombu's Redis transport sends BRPOP with a 1 s server-side timeout: a worker stopped for
# longer has no BRPOP waiting, so Redis hands it no message while it cannot run.
BRPOP_IDLE_S = 2.0
# Prints the body at the URL argv[1] (run inside a namespace, by the interpreter alone).
_READ_URL = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
)


def _ip(*args: str) -> str:
    """Run `ip ARGS`; returns its output.

    Raises:
        Failure: it exited non-zero (its stderr in the message).
    """
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise Failure(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


# Names carry the process id of the run that made them, so that runs side by side keep to
# their own, and a run's leftovers are known once its process is gone.
_NAMESPACE = re.compile(r"perito-(\d+)-[a-z]+")
_ROOT_LINK = re.compile(r"pc(\d+)[a-z]+")


@dataclass(frozen=True)
class Host:
    """A simulated worker host of run `run` (a process id): network namespace
    `perito-RUN-NAME`, joined to the root namespace by the veth pair `pcRUNNAME`
    (10.231.SUBNET.1/30, in the root namespace) and `phRUNNAME` (10.231.SUBNET.2/30, in the
    host's)."""

    name: str
    run: int
    subnet: int

    @property
    def namespace(self) -> str:
        return f"perito-{self.run}-{self.name}"

    @property
    def root_link(self) -> str:
        return f"pc{self.run}{self.name}"  # at most 15 characters, as Linux allows

    @property
    def gateway(self) -> str:
        """The root namespace's address on this host's link: where it reaches Redis."""
        return f"10.231.{self.subnet}.1"

    def create(self) -> None:
        """Make the namespace and its link, both ends up, and the namespace's loopback.

        Raises:
            Failure: an `ip` command failed.
        """
        host_link = f"ph{self.run}{self.name}"
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", host_link)
        _ip("link", "set", host_link, "netns", self.namespace)
        _ip("addr", "add", f"{self.gateway}/30", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")
        _ip("-n", self.namespace, "addr", "add", f"10.231.{self.subnet}.2/30", "dev", host_link)
        _ip("-n", self.namespace, "link", "set", host_link, "up")
        _ip("-n", self.namespace, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Delete the link and the namespace, whichever exist."""
        for args in (("link", "del", self.root_link), ("netns", "del", self.namespace)):
            with contextlib.suppress(Failure):
                _ip(*args)

    def cut(self) -> None:
        """Set the root end of the link down: nothing passes either way, nothing is reset."""
        _ip("link", "set", self.root_link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.root_link, "up")

    def command(self, args: list[str]) -> list[str]:
        """`args` run inside the host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def worker_chunks(self) -> Counter[str]:
        """The chunk tasks the worker on this host has ended, by outcome: its
        `perito_worker_chunks_total` (`done`, `skipped`: its lease lost or the job over,
        `duplicate`: another worker held it, ...) and `ended`, every task
        (`perito_worker_chunk_seconds_count`). Read inside the namespace, so also while the
        link is cut.

        Raises:
            Failure: its /metrics could not be read.
        """
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        done = subprocess.run(
            self.command([sys.executable, "-S", "-c", _READ_URL, url]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode:
            raise Failure(f"host {self.name}'s worker metrics unreadable: {done.stderr[-300:]}")
        counts: Counter[str] = Counter()
        for family in text_string_to_metric_families(done.stdout):
            for sample in family.samples:
                if sample.name == "perito_worker_chunks_total":
                    counts[sample.labels["outcome"]] += int(sample.value)
                elif sample.name == "perito_worker_chunk_seconds_count":
                    counts["ended"] += int(sample.value)
        return counts


def bytes_read(group: int) -> int:
    """Bytes the processes of process group `group` have read (`rchar` of /proc/PID/io:
    files and sockets), summed; a process that exits while read is left out."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if _stat(entry.name)[2] == group:
                io = Path(f"/proc/{entry.name}/io").read_text()
                total += int(io.split("rchar:", 1)[1].split()[0])
    return total


def remove_leftovers() -> list[str]:
    """Delete the namespaces and root links of runs whose process is gone (killed before
    they could clean up); returns their names."""
    names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    names += [
        line.split(":")[1].strip().split("@")[0]
        for line in _ip("-o", "link", "show").splitlines()
        if line.count(":") >= 2
    ]
    removed = []
    for name in names:
        match = _NAMESPACE.fullmatch(name) or _ROOT_LINK.fullmatch(name)
        if match and not Path(f"/proc/{match[1]}").exists():
            with contextlib.suppress(Failure):
                _ip(*(("netns", "del") if name.startswith("perito-") else ("link", "del")), name)
                removed.append(name)
    return removed


def free_subnets(count: int) -> list[int]:
    """`count` values of N whose 10.231.N.0/24 no interface has an address in, starting at
    one derived from this process's id (so runs side by side start apart)."""
    used = {int(n) for n in re.findall(r"inet 10\.231\.(\d+)\.", _ip("-o", "-4", "addr", "show"))}
    start = os.getpid() % 127 * 2
    free = [n for n in ((start + i) % 254 + 1 for i in range(254)) if n not in used]
    if len(free) < count:
        raise Failure("no free subnet of 10.231.0.0/16 for the simulated hosts")
    return free[:count]


def unavailable() -> str:
    """Why namespaces cannot be made here ('' if they may be)."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2; `make system-deps` installs it)"
    return ""


@contextlib.contextmanager
def simulated_hosts(*names: str) -> Iterator[list[Host]]:
    """Hosts `names` of this run, made after removing what earlier runs left (`remove_leftovers`),
    and removed afterwards whatever happens.

    Raises:
        Skipped: not root, no `ip`, or the first namespace or link could not be made.
    """
    reason = unavailable()
    if reason:
        raise Skipped(reason)
    try:
        remove_leftovers()
        subnets = free_subnets(len(names))
    except Failure as exc:
        raise Skipped(f"`ip` cannot list namespaces and links here: {exc}") from None
    hosts = [Host(name, os.getpid(), subnet) for name, subnet in zip(names, subnets, strict=True)]
    try:
        for host in hosts:
            try:
                host.create()
            except Failure as exc:
                if host is hosts[0]:
                    reason = f"cannot make a network namespace with a veth link: {exc}"
                    raise Skipped(reason) from None
                raise
        yield hosts
    finally:
        for host in hosts:
            host.remove()


def start_stack(lab: Lab, hosts: list[Host]) -> Stack:
    """The suite's stack with one worker in each of `hosts`' namespaces: redis-server also
    listening on each host's gateway address (protected mode off: those addresses exist only
    on this machine), each worker's job store and broker there, its /metrics on
    `METRICS_PORT`; the first host's worker runs `A_PROCESSES` processes. Replaces the lab's
    current stack (stopped)."""
    lab.publish("tiny")
    if lab.current is not None:
        lab.current.close()
        lab.current = None
    config = Config(workers=len(hosts), worker_env=(("PERITO_METRICS_PORT", str(METRICS_PORT)),))
    stack = Stack(lab, "cut-off-host", config)
    addresses = " ".join(["127.0.0.1", *(h.gateway for h in hosts)])
    stack.redis.args += ["--bind", addresses, "--protected-mode", "no"]  # the last --bind wins
    for host, worker in zip(hosts, stack.workers, strict=True):
        worker.args = host.command(worker.args)
        worker.env["PERITO_REDIS_URL"] = f"redis://{host.gateway}:{stack.redis_port}/0"
    stack.workers[0].env["PERITO_CONCURRENCY"] = str(A_PROCESSES)
    try:
        stack.start()
    except BaseException:
        stack.close()
        raise
    return stack


def _wait_for(what: str, timeout: float, ready: Callable[[], bool], every: float = 0.25) -> float:
    """Poll `ready` every `every` seconds until true; returns the seconds waited.

    Raises:
        Failure: not true within `timeout` seconds.
    """
    started = time.monotonic()
    while not ready():
        if time.monotonic() - started > timeout:
            raise Failure(f"{what}: not seen within {timeout:.0f}s")
        time.sleep(every)
    return time.monotonic() - started


def _resent(stack: Stack, job_id: str) -> int:
    """Chunks of the job the watchdog has sent again."""
    return int(stack.r.hget(job_key(job_id), "resent") or 0)  # type: ignore[arg-type]


def scenario_cut_off_host(lab: Lab, out: Outcome, sampler: Sampler) -> None:
    with simulated_hosts("a", "b") as (a, b):
        stack = start_stack(lab, [a, b])
        try:
            _cut_off_host(stack, a, b, out, sampler, lab)
        finally:
            stack.close()


def _cut_off_host(stack: Stack, a: Host, b: Host, out: Outcome, sampler: Sampler, lab: Lab) -> None:
    sampler.reset(stack)
    worker_a, worker_b = stack.workers
    client = stack.client()
    total = CHUNK * CHUNKS
    photos = lab.photos(total)
    image_bytes = sum(p.stat().st_size for p in photos.iterdir()) / total
    worker_b.signal_group(signal.SIGSTOP)
    try:
        time.sleep(BRPOP_IDLE_S)
        read_before = bytes_read(worker_a.pid)
        handle = client.submit_job(str(photos), model="tiny", chunk_size=CHUNK)
        out.expect(handle.last.total == total, f"the job has {handle.last.total} items")
        # A's progress from the images it reads from storage: how far a chunk has got is not
        # told outside a worker (a chunk's results may be recorded only as it ends).
        quarter = A_PROCESSES * CHUNK / 4 * image_bytes
        _wait_for(
            f"host A's {A_PROCESSES} processes reading a quarter of their chunks' images",
            120,
            lambda: bytes_read(worker_a.pid) - read_before >= quarter,
            every=0.02,
        )
        a.cut()
        cut, cut_wall = time.monotonic(), time.time()
    finally:
        worker_b.signal_group(signal.SIGCONT)
    images_read = (bytes_read(worker_a.pid) - read_before) / image_bytes
    at_cut = a.worker_chunks()
    if at_cut["ended"]:
        raise Failure(f"host A ended a chunk before the cut ({images_read:.0f} images read)")
    recorded_at_cut = client.get_job(handle.id).done

    resent_s = _wait_for(
        "the watchdog resending A's chunks",
        60,
        lambda: _resent(stack, handle.id) >= A_PROCESSES,
    )
    # B runs the chunk left in the queue, then A's, resent: A comes back once B has finished
    # the first of them.
    _wait_for(
        "host B finishing one of A's chunks",
        180,
        lambda: b.worker_chunks()["done"] >= CHUNKS - A_PROCESSES + 1,
        every=0.02,
    )
    a.restore()
    cut_s = time.monotonic() - cut
    # Each of A's chunk tasks ends once it finds its lease taken (its results refused), or
    # renewed and the chunk finished; a blocked Redis call retries within its 30 s timeout.
    _wait_for(
        "host A ending its chunks after its return",
        180,
        lambda: a.worker_chunks()["ended"] >= A_PROCESSES,
    )
    [job] = wait_terminal(client, [handle.id], timeout=120)
    after = a.worker_chunks()
    after.subtract(at_cut)
    check_job(stack, job, out)
    out.expect(
        job.state is perito.JobState.SUCCEEDED and job.succeeded == total,
        f"expected {total} succeeded, got {job.state.value} {job.succeeded}/{job.total}",
    )
    out.expect(out.resent >= A_PROCESSES, f"the watchdog resent {out.resent} of A's chunks")
    # The chunk B finished before A came back must not be recorded again from A.
    out.expect(after["skipped"] >= 1, f"no chunk task of A's was skipped after its return: {after}")
    check_store(stack, out)
    ended_s = job.finished.timestamp() - cut_wall if job.finished else 0.0
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(after.items()) if n and k != "ended")
    out.notes.append(
        f"host A's link cut (veth down) {images_read:.0f} images into its {A_PROCESSES} "
        f"chunks ({recorded_at_cut} items recorded); all {A_PROCESSES} resent by the watchdog "
        f"{resent_s:.1f}s after the cut; A back after {cut_s:.1f}s, host B having finished "
        f"one of them; A's chunk tasks after its return: {outcomes} (skipped: results not "
        f"recorded, its lease lost or the chunk done); the job ended {ended_s:.1f}s after the "
        "cut"
    )
    out.figures.update(
        images_read_by_a_at_cut=round(images_read),
        recorded_at_cut=recorded_at_cut,
        resent_after_cut_s=round(resent_s, 2),
        cut_for_s=round(cut_s, 2),
        a_chunks_after_return=dict(+after),
        job_ended_after_cut_s=round(ended_s, 2),
    )
