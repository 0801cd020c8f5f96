"""Every method of the package, by name: what mergekit's registry and our CLIs list.

Adding a method: a file in this folder with its spec, checks and ``combine``
(docs/design.md, "Adding a method"), and one line here.
"""

from __future__ import annotations

from mergekit_tada.methods import gta
from mergekit_tada.methods.base import FamilyMethod, LoraMergeMethod
from mergekit_tada.methods.ctm import LoraCtm
from mergekit_tada.methods.iso import LoraIsoC, LoraIsoCts
from mergekit_tada.methods.knots import LoraKnotsTies
from mergekit_tada.methods.magnitude_prune import LoraMagnitudePrune
from mergekit_tada.methods.regmean import LoraRegMean
from mergekit_tada.methods.tada import TadaMethod
from mergekit_tada.methods.tara import TaraMethod
from mergekit_tada.methods.task_arithmetic import LoraTaskArithmetic
from mergekit_tada.methods.tsv_m import LoraTsvM
from mergekit_tada.methods.wudi import LoraWudi

METHODS: tuple[LoraMergeMethod, ...] = (
    TadaMethod(),
    LoraTaskArithmetic(),
    *gta.METHODS,  # lora_ties, lora_dare_ties, lora_dare_linear, breadcrumbs, della
    LoraMagnitudePrune(),
    LoraKnotsTies(),
    LoraTsvM(),
    LoraIsoC(),
    LoraIsoCts(),
    LoraWudi(),
    LoraCtm(),
    LoraRegMean(),
    TaraMethod(),
)
METHOD_NAMES = frozenset(m.spec.name for m in METHODS)
# the multi-adapter rules that need nothing but the adapters (weights per
# input; what retrieval composition offers): RegMean needs prompts per model
FAMILY = tuple(
    m.spec.name for m in METHODS if isinstance(m, FamilyMethod) and not m.needs_data
)


def get(name: str) -> LoraMergeMethod | None:
    """Our method of that name (None: not ours)."""
    return next((m for m in METHODS if m.spec.name == name), None)
