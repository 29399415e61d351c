#!/usr/bin/env python3
"""Listen-mode benchmark: hopcat -l vs nc.openbsd -l / ncat -l / socat TCP-LISTEN (stdlib only).

The tool listens on a loopback port for one connection and relays it with a pipe; the benchmark
connects to it (retrying until it listens), interleaved across tools:

* upload    stdin pipe (fed from a memfd with splice) -> tool -> the connected TCP sink
* download  the connected TCP source (sendfile from a memfd) -> tool -> stdout pipe

Usage: python3 bench/listen.py [--size 1G] [--reps 5] [--tools hopcat,nc,ncat,socat] [--ratios]
       [--only up,down] [--json FILE]

The connect-mode runs of the same relays: bench/relay.py. See bench/README.md.
"""

from __future__ import annotations

import sys

from harness import pipes as P
from relay import LATENCY, THROUGHPUT

SCENARIO = P.Scenario(
    "# hopcat listen-mode benchmark", __doc__ or "", "hopcat,nc,ncat,socat", THROUGHPUT, LATENCY,
    listen=True,
)

if __name__ == "__main__":
    sys.exit(P.main(SCENARIO))
