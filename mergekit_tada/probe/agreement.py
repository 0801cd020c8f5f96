"""How well a merge agrees with each model on that model's own prompts, at
several global scales, in one streamed pass (``lambda: auto``, run/scale.py).

Every rule with a global scale c gives c times its merge at c = 1 (the scale
multiplies the merged update last; truncation and ``match_norm`` commute with
it), so the candidates need one merged update, dW*, and one pass: each chunk
of model t's prompts is streamed once as model t (base + dW_t) and once per
candidate as base + c dW* (chunks and candidates side by side through every
block). The objective, per model on its own prompts, then averaged over models:

* ``tokens``, a causal LM: the mean over tokens of KL(p_t || p_c), model t's
  next-token distribution against the merged model's (self-distillation);
* ``tokens``, an encoder: ||H_c - H_t||^2 / ||H_t||^2 over the final hidden
  states (what a task head reads);
* ``response``, a causal LM: at the end of each prompt only, where the answer
  begins (what an adapter trained on answers learned): the share of prompts
  whose most likely next token under the merge is model t's, ties broken by
  the mean KL(p_t || p_c) there;
* ``head``, classifiers (PEFT SEQ_CLS, TOKEN_CLS and QUESTION_ANS adapters:
  each model's head in its adapter): the same on each decision its head
  makes, model t's head on both, as transformers' task model reads the
  states: a prompt's class (pooled as its sequence classifier pools), each
  token's class, or a prompt's answer start and end; the share of decisions
  the merge makes as model t does, ties broken by the mean KL.

Each candidate's value is a tuple, the smallest wins (ties: the earlier
candidate). Runs on one thread, as the other passes: the choice must not
depend on the thread count.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from mergekit_tada.adapters import LoraAdapter, head_task_model
from mergekit_tada.batches import Batch, is_causal_lm
from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import Factored, single_thread
from mergekit_tada.probe.calibration import ModuleHooks, large_allocations_unmapped
from mergekit_tada.probe.grams import with_update
from mergekit_tada.streaming import StreamedModel

GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)  # every label-tuned scale we measured
# in every cache key of the pass's results: raised when its arithmetic changes
AGREEMENT_PASS_VERSION = 1


class _Variants(ModuleHooks):
    """Adds to each module the update of the current item: model t's own
    (``scale`` None) or the merged update times ``scale``."""

    def __init__(self, adapters, merged: dict[str, Factored], device) -> None:
        super().__init__(adapters, device)
        for module in merged:
            self.targets.setdefault(module, [])
        self.merged = merged  # state.owner, state.scale: the item this thread runs

    def hook(self, module: str):
        own = {
            t: self.adapters[t].factors(module, self.device)
            for t in self.targets[module]
        }
        merged = self.merged.get(module)

        def add(_module: nn.Module, inputs: tuple, output):
            with single_thread(inputs[0].device):
                if self.state.scale is None:
                    f = own.get(self.state.owner)
                    return None if f is None else with_update(output, inputs[0], f)
                if merged is None:
                    return None
                scaled = Factored(merged.B * self.state.scale, merged.A)
                return with_update(output, inputs[0], scaled)

        return add


class _Zeros(nn.Module):
    """An input embedding that gives zeros: the blocks it feeds are recorders
    that pass on the streamed states, so only the shape matters."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.width, device=ids.device)


def _classifier(model: StreamedModel, task_type: str) -> nn.Module:
    """The base's task model for ``task_type`` (HEAD_TASK_MODELS) around the
    streamed model: its head is set per model (:func:`_set_head`); padding is
    read from the attention mask (pad id -1, which no token has)."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(model.model.config)
    config.pad_token_id = -1
    with init_empty_weights(include_buffers=False):
        task = head_task_model(task_type).from_config(config)
    setattr(task, task.base_model_prefix, model.model)
    return task.eval()


def _set_head(
    model: StreamedModel, task: nn.Module, head: dict[str, torch.Tensor], what: str
) -> None:
    """Give the classifier one model's head (name in the task model ->
    weight); every weight of it must be given (``what`` names the adapter)."""
    for name, weight in head.items():
        module, _, param = name.rpartition(".")
        try:
            owner = task.get_submodule(module)
        except AttributeError:
            owner = None
        if owner is None or param not in owner._parameters:
            raise TadaError(
                f"{what}: head weight {name} is not a weight of "
                f"{type(task).__name__} ({model.what})"
            )
        owner._parameters[param] = nn.Parameter(
            weight.to(model.device, torch.float32), requires_grad=False
        )
    backbone = task.base_model_prefix + "."
    for name, param in task.named_parameters():
        if param.is_meta and not name.startswith(backbone):
            raise TadaError(
                f"{what}: {type(task).__name__}'s {name} is in neither the "
                "base nor the adapter (list its module in modules_to_save)"
            )


def _decisions(
    model: StreamedModel, task: nn.Module, batch: Batch, final: torch.Tensor
) -> torch.Tensor:
    """The task model's logits on the streamed final states of one chunk, a
    row per decision: a prompt's classes, each token's, or each prompt's
    answer start and then its end over the prompt's tokens (pads at -1e30:
    no probability, and no NaN where both sides have none)."""
    kwargs = batch.forward_kwargs()
    kwargs["input_ids"] = batch.input_ids.masked_fill(batch.attention_mask == 0, -1)
    embedding = model.model.get_input_embeddings()
    model.model.set_input_embeddings(_Zeros(final.shape[-1]))
    try:
        with model.recorders({}, final, bool(model.blocks_return_tuples)):
            out = task(**kwargs)
    finally:
        model.model.set_input_embeddings(embedding)
    mask = batch.attention_mask.bool()
    if hasattr(out, "start_logits"):
        ends = torch.cat([out.start_logits, out.end_logits]).double()
        return ends.masked_fill(~mask.repeat(2, 1), -1e30)
    return out.logits[mask] if out.logits.dim() == 3 else out.logits


@large_allocations_unmapped()
def agreement_pass(
    base_path: str,
    batches: dict[str, Sequence[Batch]],
    adapters: dict[str, LoraAdapter],
    merged: dict[str, Factored],
    scales: Sequence[float] = GRID,
    *,
    objective: str = "tokens",
    device: str | torch.device = "cpu",
    quiet: bool = False,
) -> dict[float, tuple[float, ...]]:
    """The ``objective`` (module docstring) at every scale, for the merged
    update ``merged`` (module -> dW* at scale 1, factored): (value,) for
    ``tokens``, (-agreement, KL) for ``response`` and ``head``."""
    device = torch.device(device)
    causal = is_causal_lm(base_path)
    response = objective == "response"  # a causal LM's (checked by the caller)
    head = objective == "head"  # every model has one (checked by the caller)
    decided = response or head  # agreement on one decision per prompt
    model = StreamedModel(
        base_path,
        device,
        torch.float32,
        causal_lm=causal,
        progress="Scale search",
        quiet=quiet,
    )
    variants: list[float | None] = [None, *scales]
    chunks = [(t, b.to(device)) for t, bs in batches.items() for b in bs]
    items = [(c, v) for c in range(len(chunks)) for v in variants]
    hooks = _Variants(adapters, merged, device)

    def before(i: int) -> None:
        c, v = items[i]
        hooks.state.owner, hooks.state.scale = chunks[c][0], v

    sums = {t: [0.0] * len(scales) for t in batches}
    agree = {t: [0.0] * len(scales) for t in batches}
    norms = dict.fromkeys(batches, 0.0)
    with single_thread(device), torch.inference_mode():
        records = model.block_inputs([b for _, b in chunks])
        model.model.get_input_embeddings().to("meta")
        finals = [
            states[-1]
            for states in model.forward_blocks(
                [records[c] for c, _ in items],
                [records[c][0][0] for c, _ in items],
                lambda layer, prefix: hooks.attached(
                    model.linear_modules(layer, prefix)
                ),
                before,
                order=hooks.order,
            )
        ]
        stem = model.stem_linear_modules()
        if causal and "lm_head" in hooks.targets:
            stem.append(("lm_head", model.root.get_output_embeddings()))
        classifiers: dict[str, nn.Module] = {}  # task type -> its task model
        distributions = causal or head  # KL between distributions
        with hooks.attached(iter(stem)):
            for c, (t, batch) in enumerate(chunks):
                mask = batch.attention_mask.bool()
                reference = None
                if head and (c == 0 or chunks[c - 1][0] != t):
                    kind = adapters[t].config["task_type"]
                    if kind not in classifiers:
                        classifiers[kind] = _classifier(model, kind)
                    classifier = classifiers[kind]
                    _set_head(
                        model,
                        classifier,
                        adapters[t].head_tensors(),
                        adapters[t].weights_path,
                    )
                for v in range(len(variants)):  # the model's own output first
                    i = c * len(variants) + v
                    before(i)
                    if head:
                        rows = _decisions(model, classifier, batch, finals[i])
                    else:
                        out = model.tail(batch, finals[i], head=causal)
                        states = out.logits if causal else out.last_hidden_state
                        if response:  # each prompt's last token (right padding)
                            last = mask.sum(1) - 1
                            rows = states[torch.arange(len(last), device=device), last]
                        else:
                            rows = states[mask]
                    finals[i] = None  # freed as it is used
                    rows = rows.double()
                    if distributions:
                        rows = torch.log_softmax(rows, -1)
                    if reference is None:
                        reference = rows
                        norms[t] += float(
                            len(rows) if distributions else rows.square().sum()
                        )
                    elif distributions:  # KL(p_t || p_c) summed over rows
                        sums[t][v - 1] += float(
                            (reference.exp() * (reference - rows)).sum()
                        )
                        if decided:
                            same = reference.argmax(-1) == rows.argmax(-1)
                            agree[t][v - 1] += float(same.sum())
                    else:
                        sums[t][v - 1] += float((rows - reference).square().sum())

    def mean(totals: dict, k: int) -> float:
        return sum(totals[t][k] / norms[t] for t in batches) / len(batches)

    return {
        scale: (-mean(agree, k), mean(sums, k)) if decided else (mean(sums, k),)
        for k, scale in enumerate(scales)
    }
