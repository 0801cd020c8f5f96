"""The merge methods: one file per method's maths, and what each declares.

``params.py`` is what a method declares (name, inputs, parameters) and
``specs.py`` each method's checks and per-module entry point; neither imports
mergekit (``integration.register_all`` wraps them for mergekit's registry).
``tada.py``, ``rules.py`` (task arithmetic, TIES/DARE, KnOTS, TSV-M),
``pico.py`` and ``tara.py`` are the maths: they take factors and return
factors, and never import mergekit's executor or the session. Nothing is
imported here, so importing the maths stays light.
"""
