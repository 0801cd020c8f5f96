"""The merge methods, one file each: spec (parameters, checks) next to its maths.

``base.py`` is what every method shares (the per-module job, the base class,
the family's checks), ``params.py`` what a method declares without mergekit,
``registry.py`` the list of methods. ``dense.py`` runs mergekit's element-wise
kernels on one module's dense update; ``pico.py`` is the Pico pre-step any
method can take. Methods take factors and return factors and data; they never
import mergekit's executor or the run. Nothing is imported here, so importing
one method stays light.
"""
