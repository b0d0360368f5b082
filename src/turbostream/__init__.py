"""turbostream: realtime video stylization with SD-Turbo (CUDA-graph img2img, WebSocket server, browser client)."""

__version__ = "0.1.0"
