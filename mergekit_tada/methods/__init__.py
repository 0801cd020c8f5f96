"""The merge methods: one file per method's maths, and their mergekit specs.

``specs.py`` holds what mergekit sees (a spec and a per-tensor entry point per
method) and imports mergekit; ``tada.py``, ``rules.py`` (task arithmetic,
TIES/DARE, KnOTS, TSV-M), ``pico.py`` and ``tara.py`` are the maths: they take
factors and return factors, and never import mergekit's executor or the
session. Nothing is imported here, so importing the maths stays light.
"""
