"""loraserve client."""
