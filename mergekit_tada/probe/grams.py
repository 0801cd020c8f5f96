"""RegMean's Gram pass: each model's module inputs on its own prompts, streamed.

For every LoRA'd module m and model t, the Gram G_t = X_t^T X_t / n_t of the
module's inputs over model t's prompts (n_t valid tokens: FusionBench's
per-token mean, so each model weighs the same whatever its prompt count).
X_t comes from the base with adapter t's update added to every LoRA'd
linear (``grams: model``, as in the RegMean paper: the inputs model t sees)
or from the base alone (``grams: base``), or, RegMean++ (``grams: merged``),
from model t's block on the states of the model merged so far (the blocks
below already merged). The base streams block by block (streaming.py, as the
probe's pass), every model's chunks through each block.

The merge needs, per module, only sum_t G~_t and A_t G~_t, where
G~ = alpha G + (1 - alpha) diag(G) is linear in G. So one d_in x d_in sum is
accumulated per distinct module input (over every model's chunks; q, k and v
read one input and share one sum), with A_t G_t (r_t x d_in) and diag(G_t)
per module and model, and right after its block has run the modules of each
input are reduced together to R_t = (A_t G~_t) (sum_s G~_s)^-1 (r_t x d_in):
all the merge reads, dW* = sum_t w_t B_t R_t. Peak memory: the streamed block,
one d_in x d_in float64 sum per distinct input of that block and one Cholesky
factor (README, "RegMean"); nothing of size d_in^2 outlives its block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.batches import Batch, token_count
from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import Factored, right_solve, single_thread
from mergekit_tada.probe.calibration import (
    ModuleHooks,
    large_allocations_unmapped,
    natural_key,
)
from mergekit_tada.streaming import EndOfRun, StreamedModel

ROWS = 256  # tokens per float32 product (accumulated in float64)
SLAB = 128  # Gram columns per product: the upper triangle in slabs
# in every cache key of the pass's results: raised when its arithmetic changes
# (3: one Gram sum per distinct input, float64 diagonals, one thread;
# 4: upper-triangle slabs; 5: the forward on one thread too, digests)
GRAM_PASS_VERSION = 5
Reduced = dict[tuple[str, str], torch.Tensor]  # (label, module) -> R_t


def with_update(output: torch.Tensor, x: torch.Tensor, f: Factored) -> torch.Tensor:
    """A linear's output plus its factored update s B A x (never a dense dW)."""
    return output + (x @ f.A.T) @ f.B.T


@contextlib.contextmanager
def adapter_applied(model: nn.Module, adapter: LoraAdapter, device) -> Iterator[None]:
    """``model`` runs as base + adapter (hooks on its linears; weights untouched)."""
    modules = dict(model.named_modules())
    handles = []
    for module in adapter.modules:
        if module not in modules:
            raise TadaError(
                f"{adapter.weights_path}: module {module} is not in the base model"
            )
        f = adapter.factors(module, device)
        handles.append(
            modules[module].register_forward_hook(
                lambda _m, inputs, output, f=f: with_update(output, inputs[0], f)
            )
        )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Sums:
    """Per module: A_t G_t and diag(G_t) per model; the summed Gram is its
    input's, one tensor shared by the modules that read the same input."""

    def __init__(self, gram: torch.Tensor, factors: dict[str, torch.Tensor]) -> None:
        self.gram = gram
        self.A = factors  # label -> A_t (float32)
        d = gram.shape[0]
        self.AG = {
            t: torch.zeros(a.shape[0], d, dtype=torch.float64, device=gram.device)
            for t, a in factors.items()
        }
        self.diag = {
            t: torch.zeros(d, dtype=torch.float64, device=gram.device) for t in factors
        }


def add_upper_gram(total: torch.Tensor, rows: torch.Tensor, scale: float) -> None:
    """Add scale * X^T X to the upper triangle (diagonal included) of the
    float64 ``total``: float32 products of ROWS tokens and SLAB columns, each
    cast into the sum. The Gram is symmetric, so this is about 0.6 of the full
    product's work; mirror_upper() completes it once, before the solve."""
    d = rows.shape[1]
    for block in rows.split(ROWS):
        block = block.float()
        for start in range(0, d, SLAB):
            stop = min(start + SLAB, d)
            part = block[:, :stop].T @ block[:, start:stop]
            total[:stop, start:stop].add_(part.double(), alpha=scale)


def mirror_upper(gram: torch.Tensor) -> None:
    """Copy the upper triangle that add_upper_gram() filled to the lower, in place."""
    for start in range(SLAB, gram.shape[0], SLAB):
        gram[start : start + SLAB, :start] = gram[:start, start : start + SLAB].T


def reduce(
    group: dict[str, _Sums], alpha: float, models: int
) -> dict[tuple[str, str], torch.Tensor]:
    """R_t = (A_t G~_t) (sum G~)^-1 for every module of ``group`` (modules that
    share one input Gram, solved together) and model t that updates it.

    The shared Gram is turned into sum G~ in place: nothing of size d_in^2 is
    copied but the Cholesky factor. An input feature that is 0 on every token
    (a LayerNorm weight of 0, say) leaves its row and column of every Gram 0:
    the data says nothing of it, so its column of the merge is the mean of the
    models' columns (R_t = A_t / T there, as RegMean's implementations do for
    what they cannot regress) and the rest is solved without it.
    """
    gram = next(iter(group.values())).gram
    mirror_upper(gram)
    diagonal = gram.diagonal().clone()
    live = diagonal > diagonal.max() * 1e-12
    gram.mul_(alpha).diagonal().add_(diagonal, alpha=1 - alpha)
    total = gram if bool(live.all()) else gram[live][:, live]
    keys = [(t, m) for m, sums in group.items() for t in sums.A]
    numerators = [
        alpha * group[m].AG[t] + (1 - alpha) * group[m].A[t].double() * group[m].diag[t]
        for t, m in keys
    ]
    solved = right_solve(torch.cat(numerators)[:, live], total)
    if solved is None or not torch.isfinite(solved).all():
        raise TadaError(
            f"regmean: the input Gram of {', '.join(group)} is singular with "
            f"alpha={alpha}: lower alpha (e.g. 0.5), or give more or longer prompts"
        )
    R = torch.cat([group[m].A[t].double() / models for t, m in keys])
    R[:, live] = solved
    sizes = [group[m].A[t].shape[0] for t, m in keys]
    return dict(zip(keys, R.float().split(sizes), strict=True))


class _Accumulator(ModuleHooks):
    """Pre-hooks that sum each module's input Gram per chunk's model and, with
    ``apply``, hooks that add that model's update to the module's output.

    With ``drop_rest`` (the block's outputs are dropped: RegMean++'s run of
    each model's block) a chunk's forward ends as soon as every hooked module
    of the block has read its input (:class:`EndOfRun`): the last module (the
    MLP's down projection) and what follows are not computed. Only where chunk
    0 called each hooked module of the block exactly once, so that nothing is
    left to read once all have been (a block whose calls vary per chunk runs
    whole).
    """

    def __init__(
        self,
        adapters: dict[str, LoraAdapter],
        owners: list[str],
        tokens: dict[str, int],
        apply: bool,
        device,
    ) -> None:
        super().__init__(adapters, device)
        self.owners, self.apply = owners, apply
        self.scale = {t: 1.0 / n for t, n in tokens.items()}
        self.sums: dict[str, _Sums] = {}
        self.drop_rest = False
        self.hooked: set[str] = set()  # the block's hooked modules
        self.first: dict[str, int] = {}  # chunk 0's calls of each
        # per thread (state): the chunk it runs, the modules it has called,
        # and (input tensor, its Gram sum, valid rows, diag of its chunk Gram)
        # of that chunk's last input: the tensor itself, held, so that no
        # later tensor can take its place (an address could be reused)

    def begin(self, chunk: int, mask: torch.Tensor) -> None:
        """This thread now runs ``chunk``."""
        self.state.chunk, self.state.memo, self.mask = chunk, None, mask
        self.state.called = set()

    @contextlib.contextmanager
    def attached(self, named, drop_rest: bool = False) -> Iterator[None]:
        named = list(named)
        self.hooked = {n for n, _ in named if n in self.targets}
        self.first, self.drop_rest = {}, drop_rest
        try:
            with super().attached(named):
                yield
        finally:
            self.drop_rest = False

    def _gram(self, x: torch.Tensor, total: torch.Tensor | None) -> tuple:
        """(Gram sum, valid rows in float64, diag of X^T X) of one chunk's input.

        The chunk's X^T X / n_t is added to ``total`` (a new sum where None):
        once per chunk for the modules that read the same input (q, k, v share
        one sum), as float32 products of ROWS tokens added into the float64 sum;
        only its upper triangle until reduce() mirrors it."""
        memo = self.state.memo
        if memo is not None and memo[0] is x and (total is None or total is memo[1]):
            return memo[1:]
        rows = self.rows(x)
        d = rows.shape[1]
        if total is None:
            total = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        add_upper_gram(total, rows, self.scale[self.owners[self.state.chunk]])
        rows64 = rows.double()
        result = (total, rows64, rows64.square().sum(0))
        self.state.memo = (x, *result)
        return result

    def _all_read(self, module: str) -> bool:
        """Whether this chunk's forward can end now that ``module`` has read."""
        chunk, called = self.state.chunk, self.state.called
        if chunk == 0:  # alone and first: learns the block's calls
            self.first[module] = self.first.get(module, 0) + 1
        called.add(module)
        return (
            self.drop_rest
            and chunk > 0
            and called == self.hooked
            and self.first.keys() == self.hooked
            and all(n == 1 for n in self.first.values())
        )

    def pre_hook(self, module: str):
        labels = self.targets[module]
        factors = {t: self.adapters[t].factors(module, self.device) for t in labels}

        def accumulate(_module: nn.Module | None, inputs: tuple) -> None:
            owner = self.owners[self.state.chunk]
            scale = self.scale[owner]
            x = inputs[0]
            # the sums on one torch thread: a float64 product over every token
            # of a chunk, or a Cholesky, rounds differently at 2 threads than
            # at 1 (SmolLM2's MLP inputs); in chunk order (the turn)
            with single_thread(x.device), self.order.turn(module):
                sums = self.sums.get(module)
                gram, rows, diag = self._gram(x, sums.gram if sums else None)
                if sums is None:  # the first chunk
                    A = {t: f.A for t, f in factors.items()}
                    sums = self.sums[module] = _Sums(gram, A)
                if owner in factors:
                    z = rows @ factors[owner].A.double().T
                    sums.AG[owner] += (z.T @ rows) * scale
                    sums.diag[owner] += diag * scale
            if self._all_read(module):
                raise EndOfRun

        return accumulate

    def hook(self, module: str):
        if not self.apply:
            return None
        labels = self.targets[module]
        factors = {t: self.adapters[t].factors(module, self.device) for t in labels}

        def add(_module: nn.Module, inputs: tuple, output):
            owner = self.owners[self.state.chunk]
            if owner in factors:
                return with_update(output, inputs[0], factors[owner])
            return None

        return add

    def detached(self) -> None:
        self.state.memo = None  # no input tensor outlives its block


class _MergedBlock(ModuleHooks):
    """Hooks that add each module's merged update sum_t w_t B_t R_t (RegMean's
    closed form, factored; before truncation and the global scale) to its
    output: the block as merged, which RegMean++ streams the states through."""

    def __init__(self, adapters, reduced: Reduced, weights: dict, device) -> None:
        super().__init__(adapters, device)
        self.reduced, self.weights = reduced, weights

    def hook(self, module: str):
        labels = self.targets[module]
        factors = {t: self.adapters[t].factors(module, self.device) for t in labels}
        B = torch.cat([self.weights[(t, module)] * f.B for t, f in factors.items()], 1)
        A = torch.cat([self.reduced[(t, module)].to(B.device) for t in factors])
        merged = Factored(B, A)

        def add(_module: nn.Module, inputs: tuple, output):
            with single_thread(inputs[0].device):
                return with_update(output, inputs[0], merged)

        return add


@large_allocations_unmapped()
def gram_pass(
    base_path: str,
    batches: dict[str, Sequence[Batch]],
    adapters: dict[str, LoraAdapter],
    alpha: float,
    apply: bool,
    *,
    merged_weights: dict[tuple[str, str], float] | None = None,
    device: str | torch.device = "cpu",
    quiet: bool = False,
) -> Reduced:
    """Stream the base over every model's batches; R_t per (model, module).

    ``merged_weights`` ((model, module) -> weight): RegMean++ (Nguyen et al.,
    2026). Each block's Grams come from model t's block (``apply``) run on the
    *merged* model's states for t's prompts; right after the block is solved,
    every chunk runs through the merged block (:class:`_MergedBlock`), and
    those states enter the next block. One more forward per block and chunk.
    """
    device = torch.device(device)
    model = StreamedModel(
        base_path, device, torch.float32, progress="RegMean Grams", quiet=quiet
    )
    owners = [t for t, bs in batches.items() for _ in bs]
    chunks = [b.to(device) for bs in batches.values() for b in bs]
    tokens = {t: token_count(bs) for t, bs in batches.items()}
    acc = _Accumulator(adapters, owners, tokens, apply, device)
    reduced: Reduced = {}

    def finish(modules) -> None:
        # the modules of one input (one shared Gram sum) are solved together;
        # each group is dropped once solved, so its sum is freed before the next
        groups: dict[int, dict[str, _Sums]] = {}
        for module in modules:
            if module in acc.sums:
                sums = acc.sums.pop(module)
                groups.setdefault(id(sums.gram), {})[module] = sums
        with single_thread(device):
            for key in list(groups):
                reduced.update(reduce(groups.pop(key), alpha, len(batches)))

    def before_chunk(c: int) -> None:
        acc.begin(c, chunks[c].attention_mask.bool())

    @contextlib.contextmanager
    def block(layer, prefix):
        named = list(model.linear_modules(layer, prefix))
        with acc.attached(named, drop_rest=merged_weights is not None):
            yield
        finish([n for n, _ in named])

    restream = None
    if merged_weights is not None:
        merged = _MergedBlock(adapters, reduced, merged_weights, device)

        def restream(layer, prefix):
            return merged.attached(list(model.linear_modules(layer, prefix)))

    # the whole pass on one torch thread: the sums and solves (with them on 2,
    # 1016 of SmolLM2's 1050 R_t differed) and the blocks' forward too (a
    # linear over a short chunk rounds differently at 1 and 2 threads on some
    # CPUs, AMD EPYC): the cached R_t must not depend on which run wrote them
    with single_thread(device), torch.inference_mode():
        records = model.block_inputs(chunks)
        hidden = [r[0][0] for r in records]
        model.model.get_input_embeddings().to("meta")
        finals = [
            states[-1]
            for states in model.forward_blocks(
                records, hidden, block, before_chunk, restream=restream, order=acc.order
            )
        ]
        # modules outside the blocks (the pooler; the LM head on the final states)
        stem = model.stem_linear_modules()
        head = acc.pre_hook("lm_head") if "lm_head" in acc.targets else None
        with acc.attached(iter(stem)):
            for c, b in enumerate(chunks):
                before_chunk(c)
                out = model.tail(b, finals[c])
                if head:
                    head(None, (out.last_hidden_state,))
        finish(sorted(acc.sums, key=natural_key))
    missing = sorted(
        {m for t, a in adapters.items() for m in a.modules if (t, m) not in reduced},
        key=natural_key,
    )
    if missing:
        raise TadaError(
            f"regmean: no inputs reached modules {missing[:4]} "
            f"(architecture {type(model.model).__name__})"
        )
    return reduced
