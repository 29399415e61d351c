"""The benchmarks' shared harness (stdlib only); the scripts in bench/ only declare their rows.

common     sizes, medians, interleaving order, Markdown tables, machine facts, versions, JSON, log
procs      spawning a tool, waiting for it with a timeout and its rusage, the live-pid registry;
           ToolRun, what every benchmark records of one run
endpoints  loopback endpoints that are never the limit: a zero memfd sent with splice/sendfile,
           received with MSG_TRUNC or spliced to /dev/null; the banner server for first-byte runs;
           run_tool and first_byte, one run of the tool between its endpoints
daemons    peer servers (Dante, microsocks, tinyproxy, hopcat serve, pproxy), started fresh on a
           free port in their own session, their CPU and memory read from /proc, stopped by pid
tools      the client tools (hopcat, nc.openbsd, ncat, socat, connect-proxy): where each is and
           the command line for each direction and proxy protocol
pipes      the pipe-relay scenario engine behind relay.py and proxies.py: interleaved runs over
           (route, tool, direction), summaries, declared report columns and ratios vs nc.openbsd
"""
