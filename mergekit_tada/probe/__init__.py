"""TaDA's calibrated probe: the block-streamed pass, the gates, the statistics cache.

``calibration.py`` streams the base model block by block over calibration
prompts (mergekit_tada/streaming.py) and accumulates per-module statistics;
``gates.py`` turns them into the magnitude-invariant probe and the gates;
``cache.py`` runs the passes a merge asks for, keeping results by content so
reruns skip the pass.
"""
