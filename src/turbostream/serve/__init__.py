"""`turbostream serve`, read in this order: protocol.py (what travels on the wire, Sans-I/O), http.py (plain HTTP and
the Origin check), sessions.py (one per connection), broadcast.py (the server-side source), server.py (admission and
life cycle)."""

from .server import ServerThread, TurboServer

__all__ = ["ServerThread", "TurboServer"]
