"""Whether a host name or address is this machine's loopback: ``localhost`` (and names
under it) or a loopback address. Pure."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """``host`` without a port; brackets around an IPv6 address are the caller's to drop."""
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name
        return False
