"""Code shared by the Perito server, worker and training packages.

The registry, the model runtime, image decoding and validation, the artifact manifest and the
error types live here so that server, worker and training never import each other.
"""

import os

# OpenMP (torch's intra-op threads, and oneDNN and MKL inside them) reads how its idle threads
# wait once, when torch is first imported, so this is set before any module here imports it.
# libgomp's default spins 300,000 times at every barrier before it sleeps, and a forward pass
# is a hundred or so parallel regions: where the cores are shared (decode threads, gRPC, a
# worker beside a server, other torch processes spinning the same way) a spinning thread holds
# the core its team's other thread needs, and ResNet-18's 25 ms single-image forward took
# 470-1000 ms on 2 busy cores. 1,000 spins still bridge the gaps between one region and the
# next, so an idle machine keeps the default's speed (sleeping at once, OMP_WAIT_POLICY=PASSIVE,
# cost 4-6 ms of 22), and under load it does as well as sleeping at once (10,000 did not).
# KMP_BLOCKTIME (ms) is the same knob in Intel's OpenMP. An operator's OMP_WAIT_POLICY,
# GOMP_SPINCOUNT or KMP_BLOCKTIME is kept.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    os.environ.setdefault("KMP_BLOCKTIME", "1")
