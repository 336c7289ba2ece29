"""Code shared by the Perito server, worker and training packages.

The registry, the model runtime, image decoding and validation, the artifact manifest and the
error types live here so that server, worker and training never import each other.
"""

import os

# OpenMP (torch's intra-op threads, and oneDNN and MKL inside them) reads how its idle threads
# wait once, when torch is first imported, so this is set before any module here imports it.
# Its default spins for a while at every barrier; a forward pass is a hundred or so parallel
# regions, and where the cores are shared (decode threads, gRPC, a worker beside a server, other
# processes) a spinning thread holds the core that its team's other thread needs: ResNet-18's
# 30 ms single-image forward took 200-1000 ms on 2 shared cores. PASSIVE: a waiting thread
# sleeps at once. An OMP_WAIT_POLICY (or GOMP_SPINCOUNT) already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
