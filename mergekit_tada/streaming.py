"""The base model streamed block by block (its token batches: batches.py).

The base is built on the meta device (no memory). Only its *stem* (the
embeddings, final norm, pooler, with ``causal_lm`` the LM head: everything
outside the block list) is loaded. One forward of the real transformers model
with every block replaced by a recorder keeps the exact arguments the model
hands each block (masks, rotary embeddings, positions); blocks are then read
from the base's safetensors one at a time (:meth:`StreamedModel.block`), run,
and freed, several chunks at once (chunks.py). Shared by the passes over
prompts (probe/: calibration, RegMean's Grams, ``lambda: auto``) and the
streamed training engine (training/engines.py), so models larger than memory
work for all of them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergekit_tada.batches import Batch
from mergekit_tada.chunks import ChunkOrder, run_chunks
from mergekit_tada.errors import TadaError
from mergekit_tada.loading import HeaderIndex


class EndOfRun(Exception):
    """Raised by a hook to end a chunk's forward through a block whose outputs
    are dropped (:meth:`StreamedModel.forward_blocks`): the rest is not needed."""


class _Recorder(nn.Module):
    """Stands in for block i: keeps the block's kwargs, passes hidden states on
    (as a 1-tuple where the model reads ``block(...)[0]``, as Falcon does)."""

    def __init__(
        self, index: int, sink: dict, final: torch.Tensor | None, as_tuple: bool
    ) -> None:
        super().__init__()
        self.index = index
        self.sink = sink
        self.final = final
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self.sink[self.index] = (hidden_states, args, kwargs)
        out = hidden_states if self.final is None else self.final
        return (out,) if self.as_tuple else out


STREAMING_ADVICE = (
    "the methods that read only the adapters (lora_task_arithmetic, lora_tsv_m, "
    "lora_wudi, ...) merge it with --adapter-only"
)


def _block_list(
    model: nn.Module, n_layers: int, what: str
) -> tuple[str, nn.ModuleList]:
    """The model's blocks: the one ``nn.ModuleList`` of ``num_hidden_layers``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise TadaError(
        f"streamed pass: {what} has no list of its {n_layers} blocks "
        f"({type(model).__name__}), so it cannot be streamed block by block; "
        + STREAMING_ADVICE
    )


@dataclass(frozen=True)
class _Fused:
    """Weights transformers builds from several checkpoint tensors on load (a
    MoE layer's experts stacked into one tensor), with its own converter: the
    first target's name, the converter, its (source pattern, key) pairs."""

    first: str
    converter: object  # transformers.core_model_loading.WeightConverter
    keys: tuple[tuple[str, str], ...]

    def convert(self, read: Callable, dtype: torch.dtype, device: torch.device):
        """Every target of the group, by name, from the checkpoint's tensors."""
        converter = copy.deepcopy(self.converter)
        for pattern, key in self.keys:
            load = functools.partial(read, key, dtype, device)
            converter.add_tensor(self.first, key, pattern, load)
        return {
            name: t[0] if isinstance(t, list) else t
            for name, t in converter.convert(self.first).items()
        }


def conversions_on_load(
    model: nn.Module, keys: Iterable[str]
) -> tuple[dict[str, str], dict[str, _Fused]]:
    """How transformers turns the checkpoint's ``keys`` into ``model``'s weights
    when it loads it, from its own conversion mapping: renamed weights
    (gpt_neox's ``embed_out`` is the model's ``lm_head``; legacy
    ``gamma``/``beta``), model name -> checkpoint key; and fused weights
    (MoE experts stored one by one, held as one 3-D tensor), each target
    name -> the converter and the keys it reads, in checkpoint order."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    renamed: dict[str, str] = {}
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(keys, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None:
            groups.setdefault(name, []).append((pattern, key))
        elif name != key:
            renamed[name] = key
    fused: dict[str, _Fused] = {}
    for first, pairs in groups.items():
        converter = next(c for c in converters if pairs[0][0] in c.source_patterns)
        group = _Fused(first, converter, tuple(pairs))
        for target in converter.target_patterns:  # one-to-many: q, k, v
            fused[first.replace(converter.target_patterns[0], target)] = group
    return renamed, fused


def meta_model(base_path: str) -> nn.Module:
    """The base as the class its config names, built on the meta device."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(base_path)
    names = config.architectures or []
    auto = getattr(transformers, names[0], AutoModel) if names else AutoModel
    with init_empty_weights(include_buffers=False):
        return auto.from_config(config) if auto is AutoModel else auto(config)


def renamed_on_load(base_path: str, keys: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> the name transformers gives the weight when it loads
    the base as the class its config names."""
    renamed, _ = conversions_on_load(meta_model(base_path), keys)
    return {key: name for name, key in renamed.items()}


class StreamedModel:
    """The base model as a stem in memory and blocks read on demand.

    ``self.model`` is the transformers base model (the decoder or encoder);
    with ``causal_lm`` the stem also holds the LM head (``self.root`` is then
    the ``...ForCausalLM``; TARA's streamed training uses it). Single use for
    :func:`run_calibration`, which frees the input embedding once it has
    recorded the blocks' inputs.
    """

    def __init__(
        self,
        base_path: str,
        device: torch.device,
        dtype: torch.dtype,
        causal_lm: bool = False,
        progress: str = "Streamed blocks",
        quiet: bool = True,
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        self.device = device
        self.dtype = dtype
        # the caller's thread budget, taken before its passes enter one thread:
        # that many chunks run a block at once (forward_blocks)
        self.workers = torch.get_num_threads() if device.type == "cpu" else 1
        self.progress, self.quiet = progress, quiet  # the blocks' progress bar
        self.headers = HeaderIndex(base_path)
        config = AutoConfig.from_pretrained(base_path)
        self.what = f"{base_path} ({config.model_type})"
        auto = AutoModelForCausalLM if causal_lm else AutoModel
        with init_empty_weights(include_buffers=False):
            self.root = auto.from_config(config)
        # On the meta device transformers leaves a tied LM head untied: tie it,
        # so the head is read as the input embedding it is (tied checkpoints
        # have no lm_head.weight), once here and again after loading.
        self.root.tie_weights()
        self.root.eval()
        self.model = self.root.get_decoder() if causal_lm else self.root
        self.n_layers = config.num_hidden_layers
        self.blocks_name, self.blocks = _block_list(self.root, self.n_layers, self.what)
        self.real_blocks = list(self.blocks)
        self.renamed, self.fused = conversions_on_load(
            self.root, self.headers.index.tensor_paths
        )
        self.prefix = self._checkpoint_prefix()
        self._check_block_weights()
        stem = {
            name: p
            for name, p in self.root.named_parameters()
            if not name.startswith(self.blocks_name + ".")
        }
        self._load(self.root, stem)
        self.root.tie_weights()
        self.blocks_return_tuples: bool | None = None  # found by block_inputs
        self.resident_blocks = 0  # for tests: never more than one at a time
        self.max_resident_blocks = 0

    def stored(self, key: str) -> str | None:
        """The checkpoint's key for the weight the model calls ``key``
        (checkpoint-prefixed), or None where the checkpoint lacks it."""
        if key in self.headers.index.tensor_paths:
            return key
        return self.renamed.get(key)

    def _check_block_weights(self) -> None:
        """Every weight of a block must be in the checkpoint, under the module's
        own name or one transformers renames or fuses on load, so that a block
        can be read on its own."""
        for i, block in enumerate(self.real_blocks):  # blocks may differ (MoE)
            for name, _ in block.named_parameters():
                key = self.checkpoint_name(f"{self.blocks_name}.{i}.{name}")
                if self.stored(key) is not None or key in self.fused:
                    continue
                raise TadaError(
                    f"streamed pass: {self.what} has no weight {key} in its "
                    "checkpoint, nor one transformers' conversion mapping turns "
                    "into it, so its blocks cannot be read one at a time; "
                    + STREAMING_ADVICE
                )

    def _checkpoint_prefix(self) -> str:
        name = next(
            n for n, _ in self.root.named_parameters() if n.startswith(self.blocks_name)
        )
        for prefix in ("", self.root.base_model_prefix + "."):
            if self.stored(prefix + name) is not None:
                return prefix
        raise TadaError(
            f"streamed pass: {self.what} has no weight named like {name} in its "
            "checkpoint; " + STREAMING_ADVICE
        )

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head's weight from the checkpoint (the input embedding's if
        tied; under its stored name if transformers renames it)."""
        key = self.stored("lm_head.weight")
        if key is None:
            embedding = self.model.get_input_embeddings()
            name = next(n for n, m in self.model.named_modules() if m is embedding)
            key = self.checkpoint_name(f"{name}.weight")
        return self.headers.read(key, self.dtype, self.device)

    def checkpoint_name(self, module_name: str) -> str:
        """Base-model module name -> name in the checkpoint (= the adapter's)."""
        return self.prefix + module_name

    def _load(
        self, root: nn.Module, params: dict[str, nn.Parameter], prefix: str = ""
    ) -> None:
        state, fused = {}, {}
        for name in params:
            wanted = self.checkpoint_name(prefix + name)
            key = self.stored(wanted)
            if key is not None:
                state[name] = self.headers.read(key, self.dtype, self.device)
            elif wanted in self.fused:
                group = self.fused[wanted]
                if group.first not in fused:  # each group converted once
                    fused[group.first] = group.convert(
                        self.headers.read, self.dtype, self.device
                    )
                state[name] = fused[group.first][wanted]
            else:
                raise TadaError(
                    f"streamed pass: {self.headers.path} lacks weight {wanted}"
                )
        root.load_state_dict(state, strict=False, assign=True)

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with real weights, freed (back to meta) afterwards."""
        layer = self.real_blocks[index]
        prefix = f"{self.blocks_name}.{index}."
        self._load(layer, dict(layer.named_parameters()), prefix)
        self.resident_blocks += 1
        self.max_resident_blocks = max(self.max_resident_blocks, self.resident_blocks)
        try:
            yield layer
        finally:
            layer.to("meta")
            self.resident_blocks -= 1

    def linear_modules(
        self, root: nn.Module, prefix: str
    ) -> Iterator[tuple[str, nn.Module]]:
        """Every linear map a LoRA can sit on: nn.Linear and GPT-2's Conv1D."""
        from transformers.pytorch_utils import Conv1D

        for name, module in root.named_modules():
            if isinstance(module, nn.Linear | Conv1D):
                yield self.checkpoint_name(prefix + name), module

    def stem_linear_modules(self) -> list[tuple[str, nn.Linear]]:
        """The linears outside the blocks (the pooler; not the LM head, which is
        not part of the base model), by checkpoint name."""
        blocks = self.checkpoint_name(self.blocks_name + ".")
        return [
            (n, m)
            for n, m in self.linear_modules(self.model, "")
            if not n.startswith(blocks)
        ]

    def block_inputs(self, batches: Sequence[Batch]) -> list[dict]:
        """Per batch (on the model's device): every block's recorded inputs.

        One stem forward per batch with the blocks swapped for recorders;
        ``sink[i]`` is block i's (hidden states, args, kwargs). Runs in the
        caller's grad mode.
        """
        records = []
        for batch in batches:
            for as_tuple in self._output_forms():
                sink: dict = {}
                with self.recorders(sink, as_tuple=as_tuple):
                    self.model(**batch.forward_kwargs())
                if self._chained(sink):
                    self.blocks_return_tuples = as_tuple
                    break
            else:
                raise TadaError(
                    f"streamed pass: {self.what} does not hand each block's output "
                    "straight to the next block, hidden states first, so its blocks "
                    "cannot be streamed; " + STREAMING_ADVICE
                )
            records.append(sink)
        return records

    def _output_forms(self) -> tuple[bool, ...]:
        """Whether blocks return tuples: found on the first batch, then known."""
        if self.blocks_return_tuples is None:
            return (False, True)
        return (self.blocks_return_tuples,)

    def _chained(self, sink: dict) -> bool:
        """Every block called, hidden states first, each on the very tensor the
        block before returned (the recorders pass their input on): what
        :meth:`forward_blocks` assumes when it streams the states."""
        return (
            len(sink) == self.n_layers
            and all(isinstance(sink[i][0], torch.Tensor) for i in sink)
            and all(sink[i][0] is sink[i - 1][0] for i in range(1, self.n_layers))
        )

    def forward_blocks(
        self,
        records: list[dict],
        states: list[torch.Tensor],
        attach: Callable[[nn.Module, str], contextlib.AbstractContextManager]
        | None = None,
        before_chunk: Callable[[int], None] | None = None,
        keep_all: bool = False,
        restream: Callable[[nn.Module, str], contextlib.AbstractContextManager]
        | None = None,
        order: ChunkOrder | None = None,
    ) -> list[list[torch.Tensor]]:
        """Stream every block over every chunk from its recorded inputs.

        ``states``: each chunk's input to block 0; returns each chunk's final
        hidden states, and with ``keep_all`` those at every block boundary
        (n_layers + 1; what gradient checkpointing recomputes from).
        ``attach(layer, prefix)`` wraps a block's run (hooks on its linears);
        ``before_chunk(c)`` runs before chunk c enters a block. With
        ``restream(layer, prefix)`` every chunk runs through the block a second
        time, wrapped by it, after ``attach``'s run has closed: that run's
        outputs are the next block's inputs (RegMean++: the first run reads the
        models' own blocks, the second the merged block); a hook of the first
        run may end a chunk's forward early by raising :class:`EndOfRun` once
        it has all it reads. Runs in the caller's
        grad mode. With ``order`` (hooks that add to shared sums in its turns,
        or none), up to ``self.workers`` chunks run a block at once, each on
        one torch thread (:func:`mergekit_tada.chunks.run_chunks`).
        """
        from tqdm import tqdm

        boundaries = [[h] for h in states]
        bar = tqdm(range(self.n_layers), desc=self.progress, disable=self.quiet)
        for i in bar:
            with self.block(i) as layer:
                prefix = f"{self.blocks_name}.{i}."
                runs = [attach] + ([restream] if restream else [])
                for n, wrap in enumerate(runs):
                    last = n == len(runs) - 1  # its outputs go on; others are dropped

                    def one(c: int, i=i, layer=layer, last=last) -> None:
                        if before_chunk:
                            before_chunk(c)
                        _, args, kwargs = records[c][i]
                        try:
                            out = layer(boundaries[c][-1], *args, **kwargs)
                        except EndOfRun:
                            if last:
                                raise
                            return
                        out = out[0] if isinstance(out, tuple) else out
                        if last:
                            boundaries[c] = [*boundaries[c], out] if keep_all else [out]

                    with wrap(layer, prefix) if wrap else contextlib.nullcontext():
                        run_chunks(
                            len(records),
                            one,
                            order,
                            self.workers,
                            self.device,
                            self.what,
                        )
        return boundaries

    def tail(self, batch: Batch, final: torch.Tensor, head: bool = False):
        """The stem after the blocks (final norm, pooler; with ``head`` the LM
        head too) on the streamed final states of one chunk: the model's output."""
        kwargs = batch.forward_kwargs()
        ids = kwargs.pop("input_ids")
        zeros = torch.zeros(*ids.shape, final.shape[-1], device=self.device)
        with self.recorders({}, final, bool(self.blocks_return_tuples)):
            return (self.root if head else self.model)(inputs_embeds=zeros, **kwargs)

    @contextlib.contextmanager
    def recorders(
        self, sink: dict, final: torch.Tensor | None = None, as_tuple: bool = False
    ) -> Iterator[None]:
        """Swap blocks for recorders (the last may return ``final``) for one forward."""
        for i in range(self.n_layers):
            last = i == self.n_layers - 1
            self.blocks[i] = _Recorder(i, sink, final if last else None, as_tuple)
        try:
            yield
        finally:
            for i, layer in enumerate(self.real_blocks):
                self.blocks[i] = layer
