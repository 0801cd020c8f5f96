"""Retrieval-weighted adapter composition (algorithms.md section 5; arXiv 2602.21222).

A library of LoRA adapters on one base, each with samples of its training
data, is embedded and stored in a Chroma collection (``index.py``); a new
task's inputs retrieve their nearest training examples, which become
per-adapter weights (``route.py``); the selected adapters are merged with
those weights by any of our LoRA-space methods (``compose.py``).
``library.py`` reads the library file, ``store.py`` holds the embedder and
the Chroma client (embedded by default, a server when a team shares one).
"""
