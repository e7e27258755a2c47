"""Benchmarks that compare loraserve against itself (base / one adapter / many adapters, LoRA
backends) and against its peers (Hugging Face PEFT) in one run, and write JSON, markdown and plots
under ``bench/results/``.

    python -m bench [--quick]          the CPU suite: engine, then peers
    python -m bench.engine [--quick]   issue 3: base vs one adapter vs every row its own adapter
    python -m bench.peers [--quick]    issue 5: PEFT switching / mixed batch vs loraserve

transformers, peft and matplotlib are bench-time dependencies only (the ``bench`` extra):
transformers makes the random checkpoints and runs PEFT; nothing under ``adapters/`` or
``server/`` imports them.
"""
