"""The model side of loraserve: LoRA layers, base models, adapter files and the trainer.

Nothing here imports ``server`` or ``client``; ``transformers`` and ``peft`` are never imported.
"""
