"""Start-up stub of mergekit-tada, imported by ``mergekit_tada_hook.pth``.

Appends one finder to ``sys.meta_path`` and imports nothing else. The finder
only acts when ``mergekit.merge_methods`` or ``mergekit.merge`` is imported:
then it hands over to ``mergekit_tada._hook``. See mergekit_tada/_hook.py.
"""

import sys

_WATCHED = ("mergekit.merge_methods", "mergekit.merge")


class MergekitTadaStub:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _WATCHED:
            return None
        try:
            from mergekit_tada._hook import find_spec
        except ImportError:  # package removed but this file left behind
            return None
        return find_spec(name, path)


if not any(isinstance(f, MergekitTadaStub) for f in sys.meta_path):
    sys.meta_path.insert(0, MergekitTadaStub())
