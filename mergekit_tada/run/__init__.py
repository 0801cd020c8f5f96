"""One merge run, by phase: plan (validation), prepare, execute, the output folder.

``main.run`` drives the phases; ``plan.py`` and ``planners.py`` validate and
plan before any output exists, ``prepare.py`` runs calibration and learning,
``execute.py`` merges and writes, ``report.py`` and ``plots.py`` turn the
methods' data into files, ``folder.py`` locks, stages and commits the output
folder. Nothing here imports mergekit's executor: ``integration`` hands it in.
"""
