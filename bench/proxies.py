#!/usr/bin/env python3
"""Proxy benchmark: hopcat vs nc.openbsd / ncat / connect-proxy / socat through real proxies.

relay.py's runs through proxies. For every proxy it starts a fresh daemon on a free 127.0.0.1
port (config and log in a temp dir), then measures, interleaved across proxies and tools:

* upload    stdin pipe -> tool -> proxy -> TCP sink (counts what arrives)
* download  TCP source -> proxy -> tool -> stdout pipe (the tool's stdin stays open)
* latency   spawn -> first byte of a target banner, through the proxy

plus the proxy's own CPU per GiB, read from /proc before and after each run. The daemons are
stopped at the end (SIGTERM, then SIGKILL to their whole process group) and the report says
whether any process of theirs was left. --ratios adds hopcat's figures as ratios of
nc.openbsd's per proxy, with the proxy's CPU in both rows.

Usage: python3 bench/proxies.py [--proxy dante,microsocks,tinyproxy,direct] [--size 1G]
       [--reps 5] [--latency-runs 40] [--tools hopcat,nc,ncat,connect,socat] [--json FILE]
       [--ratios]

Progress goes to stderr, the Markdown report to stdout. See bench/README.md.
"""

from __future__ import annotations

import sys

from harness import pipes as P

THROUGHPUT = P.Table(
    "## Throughput through each proxy (medians)",
    "CPU-s/GiB = (user+sys) CPU seconds per GiB relayed; (%) = share of one core over the wall "
    "time. tool = the client (wait4 rusage); proxy = the proxy's whole process group (/proc stat, "
    "threads and reaped children included); src = feeder (up) / TCP source (down); dst = TCP sink "
    "(up) / stdout reader (down). busiest = the process with the highest %core, the likely limit; "
    "Σ%core near {cores}% means all cores were busy. received = the least the sink/reader got "
    "over all runs (up through microsocks and tinyproxy: what survived the proxy's teardown at the "
    "client's FIN).",
    [
        P.PROXY,
        P.TOOL,
        P.PROTO,
        P.DIR,
        P.MB_S,
        P.MB_S_RANGE,
        P.WALL,
        P.TOOL_CPU,
        P.PROXY_CPU,
        P.SRC_CPU,
        P.DST_CPU,
        P.SUM_CORE,
        P.BUSIEST,
        P.RECEIVED,
        P.OK,
    ],
)
LATENCY = P.Table(
    "## Spawn to first target byte through each proxy",
    "The target sends a banner on accept; the tool runs in its bidirectional form with stdin "
    "open; median and p90 (nearest rank) in ms.",
    [P.PROXY, P.TOOL, P.PROTO, P.FIRST_BYTE, P.P90, P.MS_RANGE, P.OK],
)
SCENARIO = P.Scenario(
    "# hopcat proxy benchmark",
    __doc__ or "",
    "hopcat,nc,ncat,connect,socat",
    THROUGHPUT,
    LATENCY,
    default_proxies="dante,microsocks,tinyproxy",
)

if __name__ == "__main__":
    sys.exit(P.main(SCENARIO))
