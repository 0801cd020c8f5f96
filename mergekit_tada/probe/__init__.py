"""TaDA's calibrated probe: the block-streamed pass, the gates, the statistics cache.

``calibration.py`` streams the base model block by block over calibration
prompts and accumulates per-module statistics; ``gates.py`` turns them into
the magnitude-invariant probe and the gates; ``cache.py`` keeps results by
content so reruns skip the pass.
"""
