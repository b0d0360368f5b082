"""Behind a load balancer: whom to believe about a client's address (`--trusted-proxy`).

A connection's peer is the balancer, not the client. `X-Forwarded-For` names the client, but anyone can send that
header, so it is read only when the peer is a configured proxy (an address or a network: 127.0.0.1, 10.0.0.0/8).
The chain is read from the right (the entry the nearest proxy added) to the left, skipping trusted proxies; the
first address that is not one is the client. Entries a client wrote itself sit to the left of what the proxies
appended, so a forged header changes nothing. Without --trusted-proxy the header is ignored everywhere.

The address is what the server's log lines name (`TurboServer.client_address`), for now its only use: no metric
label and no limit is keyed on it (the guard's message budgets are per connection).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from websockets.datastructures import Headers

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(specs: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """'127.0.0.1', '10.0.0.0/8', '::1' -> networks; ValueError naming a spec that is not an address or network."""
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted proxy {spec!r} is not an IP address or network (e.g. 127.0.0.1, "
                             "10.0.0.0/8)") from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    """An address from a header entry or a peer: '203.0.113.7', '[2001:db8::1]:4711', '203.0.113.7:4711'."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address.ipv4_mapped or address if isinstance(address, ipaddress.IPv6Address) else address


class TrustedProxies:
    """The proxies whose X-Forwarded-For is believed."""

    def __init__(self, specs: Iterable[str] = ()) -> None:
        self.networks = parse_networks(specs)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, peer: str | None) -> bool:
        address = _address(peer) if peer else None
        return address is not None and any(address in net for net in self.networks)

    def client_address(self, peer: str | None, headers: Headers | None) -> str | None:
        """The client's address: the peer's, or (from a trusted proxy) the rightmost untrusted X-Forwarded-For entry.

        An entry that is not an address ends the walk (nothing left of it can be believed) and the last trusted
        hop is taken; so is the leftmost entry when every one is a trusted proxy.
        """
        if not self.trusts(peer) or headers is None:
            return peer
        chain = [part for value in headers.get_all("X-Forwarded-For") for part in value.split(",") if part.strip()]
        client = peer
        for entry in reversed(chain):
            address = _address(entry)
            if address is None:
                break
            client = str(address)
            if not any(address in net for net in self.networks):
                break
        return client
