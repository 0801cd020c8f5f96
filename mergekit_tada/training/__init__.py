"""Learning merge coefficients from unlabeled text (TARA's phi, TaDA's learned gates).

``objective.py`` the entropy objective, ``engines.py`` the forward engines
(in memory, block-streamed), ``loop.py`` the training loop and its cache,
``learners.py`` what TARA and TaDA learn with them.
"""
