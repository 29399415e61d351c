"""Adapters that put hopcat's tunnels under other HTTP clients. Nothing here is imported by
``import hopcat`` or by ``import hopcat.contrib``: each module imports its consumer when it is
itself imported, and each consumer comes with its extra (``pip install hopcat[httpx]``).

* ``hopcat.contrib.httpx``: ``HopcatTransport`` and ``AsyncHopcatTransport``, httpx transports
  whose connections are opened by hopcat (``httpx.Client(transport=HopcatTransport(via))``)
* ``hopcat.contrib.aiohttp``: ``HopcatConnector``, an ``aiohttp.TCPConnector`` that opens its
  connections through hopcat (``aiohttp.ClientSession(connector=HopcatConnector(via))``)
* ``hopcat.contrib.requests``: ``ProxyAdapter``, a requests ``HTTPAdapter`` whose urllib3 pools
  connect through hopcat (``session.mount("https://", ProxyAdapter(via))``)

Each takes ``via`` as ``hopcat.create_connection`` does (a URL, a ``Proxy``, a ``Chain`` or a
sequence of them), resolves names at the proxy by default, and raises the consumer's own
exceptions with hopcat's error as ``__cause__`` (``.hop``, ``.proxy``, ``.code``, ``.errno``).
"""
