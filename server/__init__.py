"""loraserve server."""
