"""Start-up hook that plugs our methods into the stock mergekit.

mergekit has no plugin discovery: its CLI only knows the methods in
``mergekit.merge_methods.registry``. The wheel (and an editable install) puts
``mergekit_tada_hook.pth`` and ``_mergekit_tada_stub.py`` in site-packages; at
every interpreter start the .pth imports the stub, which appends one finder to
``sys.meta_path`` and imports nothing else (no torch, no mergekit, not this
package). Only when ``mergekit.merge_methods`` or ``mergekit.merge`` is about
to be imported does the stub import this module, whose :func:`find_spec` wraps
the real loader so that our code runs right after the mergekit module finishes
executing:

* ``mergekit.merge_methods`` -> register our merge methods;
* ``mergekit.merge`` -> install the run-time integration (LoRA factors read
  directly instead of materialized models, the adapter and report writers).
"""

from __future__ import annotations

import importlib.machinery
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and importlib.abc are not needed at run time
    from collections.abc import Callable, Sequence
    from types import ModuleType


def _on_merge_methods(_module: ModuleType) -> None:
    from mergekit_tada.integration import register_all

    register_all()


def _on_merge(_module: ModuleType) -> None:
    from mergekit_tada.integration import install

    install()


_CALLBACKS: dict[str, Callable[[ModuleType], None]] = {
    "mergekit.merge_methods": _on_merge_methods,
    "mergekit.merge": _on_merge,
}


class _AfterExecLoader:
    """Wraps the real loader and runs a callback once the module is executed."""

    def __init__(self, inner, callback: Callable[[ModuleType], None]) -> None:
        self._inner = inner
        self._callback = callback

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._callback(module)


def find_spec(
    name: str, path: Sequence[str] | None
) -> importlib.machinery.ModuleSpec | None:
    """The spec of a watched mergekit module, with our callback after its execution."""
    callback = _CALLBACKS.get(name)
    if callback is None:
        return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return None
    spec.loader = _AfterExecLoader(spec.loader, callback)
    return spec


def ensure_installed() -> None:
    """Run the callbacks for watched modules already imported (idempotent).

    For code that imports ``mergekit_tada`` directly, in case the ``.pth`` hook
    did not run (e.g. the package is on ``sys.path`` but not installed).
    """
    for name, callback in _CALLBACKS.items():
        module = sys.modules.get(name)
        if module is not None:
            callback(module)
