"""The calibration pass: probe statistics without loading the model.

The base streams block by block (mergekit_tada/streaming.py): each block is
read from the base's safetensors, run on every chunk of calibration prompts
with hooks on its LoRA-target linears, and freed. A last forward of the
stem's tail on the streamed final states (final norm, pooler) gives modules
outside the blocks (``lm_head``, ``pooler.dense``) their statistics too.
Peak memory: the stem, one block, and the activations.

Per target module m and adapter a the pass accumulates, over valid tokens x,
    sum ||dW_a x||^2 = sum_x z^T (s_a^2 B_a^T B_a) z,  z = A_a x  (r numbers),
    sum ||x||^2, sum ||W x||^2 (the module's own output) and the token count,
which is all the probes need (mergekit_tada/probe/gates.py). :func:`calibrate`
runs the passes a merge asks for, or reads them from the cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.batches import Batch
from mergekit_tada.chunks import ChunkOrder
from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import frobenius_sq, single_thread
from mergekit_tada.streaming import StreamedModel
from mergekit_tada.texts import read_texts

LOG = logging.getLogger(__name__)

PASS_KEYS = ("calibration_samples", "calibration_max_length", "calibration_batch_size")
"""What a calibration pass's statistics depend on besides data, adapters, base."""
# in every cache key of the pass's statistics: raised when its arithmetic
# changes (2: the factors' B^T B and ||dW||^2 on one thread, thread-independent;
# 3: the forward on one thread too)
CALIBRATION_PASS_VERSION = 3


@dataclass
class ModuleStats:
    """Sufficient statistics of one (adapter, module) pair over the calibration set."""

    frob_sq: float = 0.0  # ||dW||_F^2
    sum_sq_delta: float = 0.0  # sum_x ||dW x||^2
    sum_sq_input: float = 0.0  # sum_x ||x||^2
    sum_sq_output: float = 0.0  # sum_x ||W x (+ b)||^2, the base module's output
    tokens: int = 0


Stats = dict[str, dict[str, ModuleStats]]  # adapter label -> module -> stats


def natural_key(name: str) -> list:
    """Sort key putting layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def check_statistics(stats: Stats, base_path: str) -> None:
    """Refuse statistics that went NaN/Inf (never cached), naming the first module.

    Non-finite inputs come from NaN/Inf in the base weights or from
    activations that overflow float32 (e.g. a weight of 1e37).
    """
    bad = sorted(
        {
            module
            for modules in stats.values()
            for module, s in modules.items()
            if not all(
                math.isfinite(v)
                for v in (s.frob_sq, s.sum_sq_delta, s.sum_sq_input, s.sum_sq_output)
            )
        },
        key=natural_key,
    )
    if bad:
        more = f" (and {len(bad) - 1} later module(s))" if len(bad) > 1 else ""
        raise TadaError(
            f"calibration: the input of {bad[0]}{more} became NaN or Inf in the "
            f"pass over base model {base_path}: check the base weights for NaN/Inf "
            "or values that overflow float32"
        )


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Large allocations get their own mapping during the pass; afterwards glibc's
# own steady state (its dynamic mmap threshold stops at 32 MiB, trim at 2x).
_PASS_MMAP_THRESHOLD = 1 << 20
_AFTER_MMAP_THRESHOLD, _AFTER_TRIM_THRESHOLD = 32 << 20, 64 << 20


@contextlib.contextmanager
def large_allocations_unmapped() -> Iterator[None]:
    """During the pass, tensors over 1 MiB are mmapped and unmapped when freed.

    glibc serves such tensors (block weights, activations) from its heap once
    its dynamic mmap threshold has grown, and keeps freed heap pages: the
    resident size then grows by block weights and activations that are long
    gone (0.90 GB instead of 0.67 GB peak on a 2.7 GB model; docs/performance.md).
    Costs about 2 % of the pass in page faults. A no-op without glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, _PASS_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)


class ModuleHooks:
    """Forward hooks on the adapters' modules, attached one block at a time.

    ``targets``: module -> labels of the adapters that update it; ``mask``: the
    valid tokens of the chunk this thread runs (``state``: per thread, as
    several chunks run a block at once). A hook adds to a sum shared by chunks
    inside ``order.turn``, so in chunk order. Subclasses write ``hook(name)``
    (after the module computes) or ``pre_hook(name)`` (before).
    """

    def __init__(self, adapters: dict[str, LoraAdapter], device) -> None:
        self.adapters = adapters
        self.device = device
        self.targets: dict[str, list[str]] = {}
        for label, adapter in adapters.items():
            for module in adapter.modules:
                self.targets.setdefault(module, []).append(label)
        self.state = threading.local()
        self.order = ChunkOrder()

    @property
    def mask(self) -> torch.Tensor | None:
        return getattr(self.state, "mask", None)

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self.state.mask = value

    def hook(self, module_name: str):
        """The module's forward hook (None: none)."""
        return None

    def pre_hook(self, module_name: str):
        """The module's forward pre-hook, run on its inputs before it computes
        (None: none)."""
        return None

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """A module's input or output as token rows, the chunk's padding left out
        (a tensor without the token axis, the pooler's, keeps every row)."""
        if self.mask is not None and t.shape[:-1] == self.mask.shape:
            t = t[self.mask]
        return t.reshape(-1, t.shape[-1])

    def detached(self) -> None:
        """After a block's hooks are removed."""

    @contextlib.contextmanager
    def attached(self, named) -> Iterator[None]:
        handles = []
        for name, m in named:
            if name not in self.targets:
                continue
            if (pre := self.pre_hook(name)) is not None:
                handles.append(m.register_forward_pre_hook(pre))
            if (post := self.hook(name)) is not None:
                handles.append(m.register_forward_hook(post))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.detached()


class _Accumulator(ModuleHooks):
    """Hooks that turn a module's inputs into probe statistics for every adapter.

    Factors are read when a block's hooks are attached and dropped when they are
    removed: at most one block's worth of adapter factors is held.
    """

    CHUNK_TOKENS = 256

    def __init__(self, adapters: dict[str, LoraAdapter], stats: Stats, device) -> None:
        super().__init__(adapters, device)
        self.stats = stats

    def hook(self, module_name: str, output_gram: torch.Tensor | None = None):
        """A forward hook accumulating (A, G = s^2 B^T B) statistics for the module.

        ``output_gram``: W^T W (float64) for a module called without its output
        (the LM head on the final states): sum ||W x||^2 = sum x^T (W^T W) x,
        never the tokens x vocabulary logits.
        """
        prepared = []
        # on one thread, as the sums below: B^T B reduces over d_out, and at 2
        # threads SmolLM2's MLP factors gave other last bits
        with single_thread(self.device):
            for label in self.targets[module_name]:
                f = self.adapters[label].factors(module_name, self.device)
                A, B = f.A.double(), f.B.double()
                entry = self.stats[label].setdefault(module_name, ModuleStats())
                entry.frob_sq = frobenius_sq(f)
                prepared.append((entry, A, B.T @ B))

        def accumulate(_module: nn.Module, inputs: tuple, output) -> None:
            x = self.rows(inputs[0])
            y = None if output is None else self.rows(output)
            # float64 in chunks of tokens: a float64 copy of a whole MLP input
            # would be the largest tensor of the block phase
            sum_sq_input, sum_sq_output = 0.0, 0.0
            sum_sq_delta = [0.0] * len(prepared)
            # one torch thread: ATen splits long reductions by the thread
            # count, and the sums' last bits would depend on it
            with single_thread(x.device):
                for chunk in x.split(self.CHUNK_TOKENS):
                    c = chunk.double().flatten()
                    sum_sq_input += float(torch.dot(c, c))
                    c = c.view(chunk.shape)
                    for n, (_, A, G) in enumerate(prepared):
                        z = c @ A.T
                        sum_sq_delta[n] += float(((z @ G) * z).sum())
                    if y is None:
                        sum_sq_output += float(((c @ output_gram) * c).sum())
                if y is not None:
                    for chunk in y.split(self.CHUNK_TOKENS):
                        c = chunk.double().flatten()
                        sum_sq_output += float(torch.dot(c, c))
            with self.order.turn(module_name):
                for (entry, _, _), delta in zip(prepared, sum_sq_delta, strict=True):
                    entry.sum_sq_delta += delta
                    entry.sum_sq_input += sum_sq_input
                    entry.sum_sq_output += sum_sq_output
                    entry.tokens += x.shape[0]

        return accumulate


def row_gram(weight: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """W^T W in float64, a block of rows at a time (no float64 copy of a vocab x
    hidden head), on one thread (its sums' bits must not depend on the count)."""
    gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64)
    with single_thread(weight.device):
        gram = gram.to(weight.device)
        for block in weight.split(rows):
            block = block.double()
            gram += block.T @ block
    return gram


@large_allocations_unmapped()
def run_calibration(
    base_path: str,
    batches: Sequence[Batch],
    adapters: dict[str, LoraAdapter],
    *,
    device: str | torch.device = "cpu",
    quiet: bool = False,
    streamed: StreamedModel | None = None,
) -> Stats:
    """Stream the base over the batches; statistics for every adapter module."""
    device = torch.device(device)
    model = streamed or StreamedModel(base_path, device, torch.float32)
    stats: Stats = {label: {} for label in adapters}
    acc = _Accumulator(adapters, stats, device)
    on_device = [b.to(device) for b in batches]
    # on one torch thread, forward included: a linear over a short chunk (11
    # tokens) rounds differently at 1 and 2 threads on some CPUs (AMD EPYC),
    # and the cached statistics must not depend on which run wrote them
    with single_thread(device), torch.inference_mode():
        # 1. the exact inputs and kwargs of every block, per chunk
        records = model.block_inputs(on_device)
        hidden = [r[0][0] for r in records]
        # The input embedding (vocab x hidden, float32) is not needed again: the
        # tail forward below starts from zero embeddings, and its last recorder
        # returns the streamed states.
        model.model.get_input_embeddings().to("meta")
        # 2. stream the blocks
        model.progress, model.quiet = "Calibration blocks", quiet

        def chunk_mask(c: int) -> None:
            acc.mask = on_device[c].attention_mask.bool()

        hidden = [
            states[-1]
            for states in model.forward_blocks(
                records,
                hidden,
                lambda layer, prefix: acc.attached(model.linear_modules(layer, prefix)),
                chunk_mask,
                order=acc.order,
            )
        ]
        # 3. the stem's tail (final norm, pooler) and lm_head on the final states
        stem = model.stem_linear_modules()
        lm_hook = None
        if "lm_head" in acc.targets:
            lm_hook = acc.hook("lm_head", output_gram=row_gram(model.lm_head_weight()))
        with acc.attached(iter(stem)):
            for c, b in enumerate(on_device):
                chunk_mask(c)
                out = model.tail(b, hidden[c])
                if lm_hook:
                    lm_hook(None, (out.last_hidden_state,), None)
    missing = [
        (label, m)
        for label, a in adapters.items()
        for m in a.modules
        if m not in stats[label]
    ]
    if missing:
        raise TadaError(
            f"calibration: no activations reached adapter modules {missing[:4]} "
            f"(architecture {type(model.model).__name__})"
        )
    return stats


def read_prompts(path: str, samples: int) -> list[str]:
    """The first ``samples`` non-empty prompts of a .txt, .jsonl or saved dataset."""
    texts = read_texts(path, "calibration")
    if len(texts) < samples:
        LOG.warning(
            "calibration: %s has %d prompts, fewer than calibration_samples=%d; using them all",
            path,
            len(texts),
            samples,
        )
    return texts[:samples]
