"""The targets a benchmark states, each met or missed, and the exit status they give.

Every benchmark with a target ends with `sys.exit(report(...))`: one line per target, ending
`-> PASS` or `-> MISS`, and exit status 1 when any target was missed (or an answer was wrong),
so a script or CI that runs it sees the miss without reading the figures.
"""

from __future__ import annotations

import sys


def report(targets: list[tuple[str, bool]]) -> int:
    """Print each `(line, met)` as `line -> PASS` or `line -> MISS`.

    Args:
        targets: what was measured against what was promised, in words (`"job throughput:
            0.93 x raw (target >= 0.90)"`), and whether the promise held.

    Returns:
        The process exit status: 0 when every target was met, 1 otherwise.
    """
    for line, met in targets:
        print(f"{line} -> {'PASS' if met else 'MISS'}")
    missed = sum(not met for _, met in targets)
    if missed:
        print(f"{missed} of {len(targets)} targets missed", file=sys.stderr)
    return 1 if missed else 0
