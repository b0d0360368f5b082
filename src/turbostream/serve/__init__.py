"""`turbostream serve`, read in this order: protocol.py (what travels on the wire, Sans-I/O), http.py (plain HTTP and
the Origin check), guard.py (ceilings below the WebSocket protocol: sockets, handshakes, send buffers, headers), sessions.py (one per connection), devices.py (one
batcher per GPU, streams placed on them), broadcast.py (the server-side source), server.py (admission and life cycle);
proxy.py (X-Forwarded-For behind a trusted balancer) and integrations.py (OSC, playlists, --publish) on the side."""

from .server import ServerThread, TurboServer

__all__ = ["ServerThread", "TurboServer"]
