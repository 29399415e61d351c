#!/usr/bin/env python3
"""Relay benchmark: hopcat vs nc.openbsd / ncat / socat (stdlib only).

Measures, interleaved across tools, for each tool relaying between a pipe and a loopback TCP
socket:

* upload    stdin pipe (fed from a memfd with splice) -> tool -> TCP sink
* download  TCP source (sendfile from a memfd) -> tool -> stdout pipe (spliced to /dev/null);
            the tool's stdin stays open, it must exit by itself when the server closes
* latency   spawn -> first byte of a server banner readable on the tool's stdout

Usage: python3 bench/relay.py [--size 1G] [--reps 5] [--latency-runs 40]
       [--tools hopcat,nc,ncat,socat] [--only up,down,latency] [--json FILE] [--ratios]

The same runs through proxies: bench/proxies.py. Progress goes to stderr, the Markdown report
to stdout. See bench/README.md.
"""

from __future__ import annotations

import sys

from harness import pipes as P

THROUGHPUT = P.Table(
    "## Throughput (medians)",
    "src = feeder thread writing the tool's stdin (up) / TCP source server (down); dst = TCP sink "
    "server (up) / reader draining the tool's stdout (down). CPU-s/GiB = (user+sys) CPU seconds "
    "per GiB relayed; (%) = share of one core over the wall time.",
    [
        P.TOOL,
        P.DIR,
        P.MB_S,
        P.MB_S_RANGE,
        P.WALL,
        P.TOOL_CPU,
        P.TOOL_USR_SYS,
        P.SRC_CPU,
        P.DST_CPU,
        P.OK,
    ],
)
LATENCY = P.Table(
    "## Spawn to first byte (loopback server sends a banner on accept)",
    "",
    [P.TOOL, P.FIRST_BYTE, P.P90, P.MS_RANGE, P.OK],
)
SCENARIO = P.Scenario(
    "# hopcat relay benchmark", __doc__ or "", "hopcat,nc,ncat,socat", THROUGHPUT, LATENCY
)

if __name__ == "__main__":
    sys.exit(P.main(SCENARIO))
