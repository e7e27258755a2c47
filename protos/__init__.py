"""loraserve protos."""
