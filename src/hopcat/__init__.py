"""hopcat: a fast, correct netcat for proxies and OpenSSH's ProxyCommand."""

__version__ = "0.1.0"
__all__ = ["__version__"]
