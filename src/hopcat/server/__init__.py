"""``hopcat serve``: a SOCKS4/4a/5 and HTTP CONNECT proxy server on asyncio with a splice relay.

Imported only under ``hopcat serve``: the client's start-up never pays for asyncio.
Modules: ``cli`` (options, checks), ``serve`` (listeners, limits, signals), ``handler`` (one
connection), ``relay`` (splice through pooled pipes), ``policy`` (pure rules and credentials),
``log`` (text/JSON lines).
"""
