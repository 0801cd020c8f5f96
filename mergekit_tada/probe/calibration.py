"""Block-streamed calibration pass: probe statistics without loading the model.

The base model is built on the meta device (no memory). Only its *stem* (the
embeddings, final norm, pooler: everything outside the block list) is loaded.
Then, for each chunk of calibration prompts, one forward pass of the real
transformers base model runs with every block replaced by a recorder that
passes the hidden states through and keeps the exact keyword arguments the
model hands that block (masks, rotary embeddings, positions). Blocks are then
streamed: block i is loaded from the base's safetensors, run on every chunk
with hooks on its LoRA-target linears, and freed. A last forward with the
recorders returning the streamed final states runs the stem's tail (final
norm, pooler) so modules outside the blocks (``lm_head``, ``pooler.dense``) get
their statistics too. Peak memory: the stem, one block, and the activations.

Per target module m and adapter a the pass accumulates, over valid tokens x,
    sum ||dW_a x||^2 = sum_x z^T (s_a^2 B_a^T B_a) z,  z = A_a x  (r numbers),
    sum ||x||^2, sum ||W x||^2 (the module's own output) and the token count,
which is all the probes need (mergekit_tada/probe/gates.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.errors import TadaError
from mergekit_tada.loading import HeaderIndex
from mergekit_tada.lowrank import frobenius_sq, single_thread
from mergekit_tada.texts import read_texts

LOG = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "bert")


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


class _Recorder(nn.Module):
    """Stands in for block i: keeps the block's kwargs, passes hidden states on."""

    def __init__(
        self, index: int, sink: dict, final: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.index = index
        self.sink = sink
        self.final = final

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.sink[self.index] = (hidden_states, args, kwargs)
        return hidden_states if self.final is None else self.final


def _block_list(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise TadaError(
        f"calibration: no block list of {n_layers} layers found in {type(model).__name__}"
    )


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
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        self.device = device
        self.dtype = dtype
        self.headers = HeaderIndex(base_path)
        config = AutoConfig.from_pretrained(base_path)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise TadaError(
                f"calibration: architecture {config.model_type!r} "
                f"({', '.join(config.architectures or [])}) is not supported by the "
                f"streamed calibration pass; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
                "Use gates: uniform or fixed."
            )
        auto = AutoModelForCausalLM if causal_lm else AutoModel
        with init_empty_weights(include_buffers=False):
            self.root = auto.from_config(config)
        self.root.eval()
        self.model = self.root.get_decoder() if causal_lm else self.root
        self.n_layers = config.num_hidden_layers
        self.blocks_name, self.blocks = _block_list(self.root, self.n_layers)
        self.real_blocks = list(self.blocks)
        self.prefix = self._checkpoint_prefix()
        stem = {
            name: p
            for name, p in self.root.named_parameters()
            if not name.startswith(self.blocks_name + ".")
        }
        self._load(self.root, stem)
        self.resident_blocks = 0  # for tests: never more than one at a time
        self.max_resident_blocks = 0

    def _checkpoint_prefix(self) -> str:
        name = next(
            n for n, _ in self.root.named_parameters() if n.startswith(self.blocks_name)
        )
        for prefix in ("", self.root.base_model_prefix + "."):
            if prefix + name in self.headers.index.tensor_paths:
                return prefix
        raise TadaError(
            f"calibration: {self.headers.path} has no weight named like {name}"
        )

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head's weight from the checkpoint (the input embedding's if tied)."""
        key = "lm_head.weight"
        if key not in self.headers.index.tensor_paths:
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
        state = {}
        for name in params:
            key = self.checkpoint_name(prefix + name)
            if key not in self.headers.index.tensor_paths:
                raise TadaError(f"calibration: {self.headers.path} lacks weight {key}")
            state[name] = self.headers.read(key, self.dtype, self.device)
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
    ) -> Iterator[tuple[str, nn.Linear]]:
        for name, module in root.named_modules():
            if isinstance(module, nn.Linear):
                yield self.checkpoint_name(prefix + name), module

    def block_inputs(self, batches: Sequence[Batch]) -> list[dict]:
        """Per batch (on the model's device): every block's recorded inputs.

        One stem forward per batch with the blocks swapped for recorders;
        ``sink[i]`` is block i's (hidden states, args, kwargs). Runs in the
        caller's grad mode.
        """
        records = []
        for batch in batches:
            sink: dict = {}
            with self.recorders(sink):
                self.model(**batch.forward_kwargs())
            records.append(sink)
        return records

    @contextlib.contextmanager
    def recorders(
        self, sink: dict, final: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Swap blocks for recorders (the last may return ``final``) for one forward."""
        for i in range(self.n_layers):
            self.blocks[i] = _Recorder(
                i, sink, final if i == self.n_layers - 1 else None
            )
        try:
            yield
        finally:
            for i, layer in enumerate(self.real_blocks):
                self.blocks[i] = layer


class _Accumulator:
    """Hooks that turn a module's inputs into probe statistics for every adapter.

    Factors are read when a block's hooks are attached and dropped when they are
    removed: at most one block's worth of adapter factors is held.
    """

    CHUNK_TOKENS = 256

    def __init__(self, adapters: dict[str, LoraAdapter], stats: Stats, device) -> None:
        self.adapters = adapters
        self.device = device
        self.targets: dict[str, list[str]] = {}  # module -> adapter labels
        for label, adapter in adapters.items():
            for module in adapter.modules:
                self.targets.setdefault(module, []).append(label)
        self.stats = stats
        self.mask: torch.Tensor | None = None  # valid-token mask of the current chunk

    def hook(self, module_name: str, output_gram: torch.Tensor | None = None):
        """A forward hook accumulating (A, G = s^2 B^T B) statistics for the module.

        ``output_gram``: W^T W (float64) for a module called without its output
        (the LM head on the final states): sum ||W x||^2 = sum x^T (W^T W) x,
        never the tokens x vocabulary logits.
        """
        prepared = []
        for label in self.targets[module_name]:
            f = self.adapters[label].factors(module_name, self.device)
            A, B = f.A.double(), f.B.double()
            entry = self.stats[label].setdefault(module_name, ModuleStats())
            entry.frob_sq = frobenius_sq(f)
            prepared.append((entry, A, B.T @ B))

        def accumulate(_module: nn.Module, inputs: tuple, output) -> None:
            x, y = inputs[0], output
            if self.mask is not None and x.shape[:-1] == self.mask.shape:
                x = x[self.mask]
                y = None if y is None else y[self.mask]
            x = x.reshape(-1, x.shape[-1])
            y = None if y is None else y.reshape(-1, y.shape[-1])
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
            for (entry, _, _), delta in zip(prepared, sum_sq_delta, strict=True):
                entry.sum_sq_delta += delta
                entry.sum_sq_input += sum_sq_input
                entry.sum_sq_output += sum_sq_output
                entry.tokens += x.shape[0]

        return accumulate

    @contextlib.contextmanager
    def attached(self, named) -> Iterator[None]:
        handles = [
            m.register_forward_hook(self.hook(name))
            for name, m in named
            if name in self.targets
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    extra: dict

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            {k: v.to(device) for k, v in self.extra.items()},
        )

    def forward_kwargs(self) -> dict:
        # use_cache=False: a KV cache would keep every streamed block's keys and
        # values alive for the whole pass.
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "use_cache": False,
            **self.extra,
        }


def make_batches(
    tokenizer, texts: Sequence[str], max_length: int, batch_size: int
) -> list[Batch]:
    """Right-padded chunks (causal masks keep valid tokens blind to padding)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        extra = {
            k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")
        }
        batches.append(Batch(enc["input_ids"], enc["attention_mask"], extra))
    return batches


def batches_digest(batches: Sequence[Batch]) -> str:
    """sha256 of every token id and mask used: what cache keys cover."""
    digest = hashlib.sha256()
    for b in batches:
        digest.update(b.input_ids.numpy().tobytes())
        digest.update(b.attention_mask.numpy().tobytes())
    return digest.hexdigest()


def token_count(batches: Sequence[Batch]) -> int:
    """Valid (non-padding) tokens in the batches."""
    return int(sum(int(b.attention_mask.sum()) for b in batches))


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
    from tqdm import tqdm

    device = torch.device(device)
    model = streamed or StreamedModel(base_path, device, torch.float32)
    stats: Stats = {label: {} for label in adapters}
    acc = _Accumulator(adapters, stats, device)
    on_device = [b.to(device) for b in batches]
    with torch.inference_mode():
        # 1. the exact inputs and kwargs of every block, per chunk
        records = model.block_inputs(on_device)
        hidden = [r[0][0] for r in records]
        # The input embedding (vocab x hidden, float32) is not needed again: the
        # tail forward below starts from zero embeddings, and its last recorder
        # returns the streamed states.
        model.model.get_input_embeddings().to("meta")
        # 2. stream the blocks
        bar = tqdm(range(model.n_layers), desc="Calibration blocks", disable=quiet)
        for i in bar:
            with model.block(i) as layer:
                prefix = f"{model.blocks_name}.{i}."
                with acc.attached(model.linear_modules(layer, prefix)):
                    for c, b in enumerate(on_device):
                        acc.mask = b.attention_mask.bool()
                        _, args, kwargs = records[c][i]
                        out = layer(hidden[c], *args, **kwargs)
                        hidden[c] = out[0] if isinstance(out, tuple) else out
        # 3. the stem's tail (final norm, pooler) and lm_head on the final states
        stem = [
            (n, m)
            for n, m in model.linear_modules(model.model, "")
            if not n.startswith(model.checkpoint_name(model.blocks_name + "."))
        ]
        lm_hook = None
        if "lm_head" in acc.targets:
            lm_hook = acc.hook("lm_head", output_gram=row_gram(model.lm_head_weight()))
        with acc.attached(iter(stem)):
            for c, b in enumerate(on_device):
                acc.mask = b.attention_mask.bool()
                kwargs = b.forward_kwargs()
                ids = kwargs.pop("input_ids")
                zeros = torch.zeros(*ids.shape, hidden[c].shape[-1], device=device)
                with model.recorders({}, final=hidden[c]):
                    out = model.model(inputs_embeds=zeros, **kwargs)
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


def tokenizer_for(base_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_path)
    except Exception as error:
        raise TadaError(
            f"calibration: base model {base_path} has no usable tokenizer ({error}); "
            "gates: probe tokenizes the calibration prompts with the base's tokenizer"
        ) from None


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
