"""hopcat on asyncio: drivers over the same engine as the blocking client, for library callers
and ``hopcat serve``. The CLI, ``hopcat.net``, ``hopcat.relay`` and ``hopcat.proto`` never
import this package, so the client's start-up never pays for asyncio."""
