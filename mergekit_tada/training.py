"""The one loop that learns merge coefficients from unlabeled text.

Used by TARA (one coefficient per rank-1 direction, mergekit_tada/methods/tara.py).
The base model runs with its weights frozen, whole (``InMemory``) or block by
block (``Streamed``, for models larger than memory: same gradients); every
LoRA'd linear gets a forward hook that adds the factored update for the
current coefficients,

    y = W x + B @ sum_g (phi_g * (A_g x))        (never a dense dW)

so only phi trains. Task i's unlabeled text gives H_i(phi): the mean entropy
of the next-token distribution softmax(logits) over its non-padding positions
(every position's prediction). z_i is the same for input i alone (its own
update, ``Directions.single(i)``), computed once over all of task i's batches.
The objective, with preference rho (summing to 1) and alpha = 1 by default:

    stch:    Psi(phi) = alpha * log sum_i exp(rho_i (H_i(phi) - z_i) / alpha)
    linear:  Psi(phi) = sum_i rho_i (H_i(phi) - z_i)

AdamW (torch's defaults beyond ``lr``: betas (0.9, 0.999), weight decay 0.01)
on phi only; step k uses batch k mod n_i of every task (no sampling). The
two sums over tokens (the entropies, phi's gradients) run on one torch
thread on the CPU, so reruns are bit-identical whatever the thread count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import single_thread
from mergekit_tada.methods.tara import Directions
from mergekit_tada.probe.calibration import Batch

LOG = logging.getLogger(__name__)


@dataclass
class Task:
    """One input's unlabeled text as fixed token batches."""

    name: str
    batches: list[Batch]


@dataclass
class TrainingResult:
    phi: dict[str, torch.Tensor]  # module -> learned coefficients
    z: list[float]  # each input alone on its own text
    h_before: list[float]  # the merged model at phi_0, over all batches
    h_after: list[float]  # at the learned phi
    history: list[dict] = field(default_factory=list)  # per step: psi, gaps
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # free, learned


def objective_value(
    gaps: torch.Tensor, preference: torch.Tensor, objective: str, alpha: float
) -> torch.Tensor:
    """Psi from the per-task gaps H_i - z_i (see the module docstring)."""
    if objective == "linear":
        return (preference * gaps).sum()
    return alpha * torch.logsumexp(preference * gaps / alpha, dim=0)


def entropy_sum(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token entropies over positions where mask is 1, and their count."""
    # at least float32 (bf16 logits lose the entropy), float64 kept for tests
    logp = torch.log_softmax(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1
    )
    entropy = -(logp.exp() * logp).sum(-1)
    valid = mask.bool()
    # a sum over every position: on one thread, so its bits do not depend on
    # the thread count. The rest of a training step keeps its threads: matmuls
    # and per-row reductions (softmax, norms) do not sum across threads
    # (measured identical on 1 and 2 threads; tests/test_tara.py).
    with single_thread(logits.device):
        total = entropy[valid].sum()
    return total, int(valid.sum())


class _Scaled(torch.autograd.Function):
    """``z * phi`` whose gradient for phi (a sum over tokens) runs on one thread."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, phi)
        return z * phi

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, phi = ctx.saved_tensors
        grad_z = grad * phi if ctx.needs_input_grad[0] else None
        grad_phi = None
        if ctx.needs_input_grad[1]:
            with single_thread(grad.device):
                grad_phi = (grad * z).reshape(-1, z.shape[-1]).sum(0)
        return grad_z, grad_phi


class CoefficientHooks:
    """Adds dW(phi) x to the output of each hooked linear module."""

    def __init__(
        self,
        model: nn.Module,
        directions: dict[str, Directions],
        phi: dict[str, torch.Tensor],
        device: torch.device,
    ) -> None:
        self.phi = phi
        modules = dict(model.named_modules())
        missing = sorted(set(directions) - set(modules))
        if missing:
            raise TadaError(
                f"modules {missing[:3]} of the adapters are not in the base"
            )
        self._factors = {
            name: (d.B.to(device), d.A.to(device), d.groups)
            for name, d in directions.items()
        }
        self._handles = [
            modules[name].register_forward_hook(self._hook(name)) for name in directions
        ]

    def _hook(self, name: str):
        def add_update(_module, inputs, output):
            B, A, groups = self._factors[name]
            z = inputs[0].to(A.dtype) @ A.T  # (..., groups * R)
            z = _Scaled.apply(z, self.phi[name]).unflatten(-1, (groups, -1)).sum(-2)
            return output + (z @ B.T).to(output.dtype)

        return add_update

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _forward_entropy(
    model: nn.Module, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, int]:
    batch = batch.to(device)
    logits = model(**batch.forward_kwargs()).logits
    return entropy_sum(logits, batch.attention_mask)


class InMemory:
    """The base loaded whole; autograd through the model for every step."""

    mode = "memory"

    def __init__(
        self, model: nn.Module, directions: dict[str, Directions], device: torch.device
    ) -> None:
        self.model = model.requires_grad_(False).eval()
        self.device = device
        self.hooks = CoefficientHooks(model, directions, {}, device)

    @torch.no_grad()
    def entropy(self, phi: dict[str, torch.Tensor], batch: Batch) -> tuple[float, int]:
        self.hooks.phi = phi
        s, n = _forward_entropy(self.model, batch, self.device)
        return float(s), n

    def step(self, phi, batches, baseline, rho, objective, alpha):
        """Psi and the gaps for one batch per task; phi's gradients accumulated."""
        self.hooks.phi = phi
        entropies = []
        for batch in batches:
            s, n = _forward_entropy(self.model, batch, self.device)
            entropies.append(s / max(n, 1))
        gaps = torch.stack(entropies) - baseline
        psi = objective_value(gaps, rho, objective, alpha)
        if torch.isfinite(psi) and psi.requires_grad:
            psi.backward()
        return psi.detach(), gaps.detach()

    def close(self) -> None:
        self.hooks.remove()


class Streamed:
    """The base streamed block by block: for models larger than memory.

    Forward: the stem records every block's inputs (masks, rotary
    embeddings), then each block is read from the safetensors, run on every
    task's batch without autograd, and freed; only the hidden states at block
    boundaries are kept. The head (final norm, ``lm_head``) runs with autograd
    from the last states, Psi is formed and its gradient with respect to those
    states taken. Backward: block by block from the last, each block is read
    again and recomputed from its saved input with autograd, and the incoming
    gradient pushed through it (gradient checkpointing, weights re-read). The
    gradients of phi are those of the in-memory mode (tested).
    Memory: the stem, one block, and the boundary states of one batch per task.
    """

    mode = "streamed"

    def __init__(
        self, base_path: str, directions: dict[str, Directions], device: torch.device
    ) -> None:
        from mergekit_tada.probe.calibration import StreamedModel

        self.sm = StreamedModel(base_path, device, torch.float32, causal_lm=True)
        self.sm.root.requires_grad_(False)
        self.device = device
        if self.sm.prefix:
            raise TadaError(
                f"tara: streamed training needs a checkpoint with the LM head's names "
                f"({base_path} stores the base model's weights under no prefix)"
            )
        self.hooks = CoefficientHooks(self.sm.root, directions, {}, device)

    def _states(self, batches: Sequence[Batch]) -> tuple[list[dict], list[list]]:
        """Every block's recorded inputs and the hidden states at block boundaries."""
        with torch.no_grad():
            records = self.sm.block_inputs([b.to(self.device) for b in batches])
            states = [[sink[0][0]] for sink in records]
            for i in range(self.sm.n_layers):
                with self.sm.block(i) as layer:
                    for c, sink in enumerate(records):
                        _, args, kwargs = sink[i]
                        out = layer(states[c][-1], *args, **kwargs)
                        states[c].append(out[0] if isinstance(out, tuple) else out)
        return records, states

    def _head(self, batch: Batch, final: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The stem's tail and the LM head on the last states: entropy sum, count."""
        batch = batch.to(self.device)
        kwargs = batch.forward_kwargs()
        ids = kwargs.pop("input_ids")
        zeros = torch.zeros(*ids.shape, final.shape[-1], device=self.device)
        with self.sm.recorders({}, final=final):
            logits = self.sm.root(inputs_embeds=zeros, **kwargs).logits
        return entropy_sum(logits, batch.attention_mask)

    @torch.no_grad()
    def entropy(self, phi: dict[str, torch.Tensor], batch: Batch) -> tuple[float, int]:
        self.hooks.phi = phi
        _, states = self._states([batch])
        s, n = self._head(batch, states[0][-1])
        return float(s), n

    def step(self, phi, batches, baseline, rho, objective, alpha):
        self.hooks.phi = phi
        records, states = self._states(batches)
        finals, entropies = [], []
        for batch, st in zip(batches, states, strict=True):
            final = st[-1].detach().requires_grad_(True)
            s, n = self._head(batch, final)
            finals.append(final)
            entropies.append(s / max(n, 1))
        gaps = torch.stack(entropies) - baseline
        psi = objective_value(gaps, rho, objective, alpha)
        if not torch.isfinite(psi):
            return psi.detach(), gaps.detach()
        psi.backward()  # phi of modules in the head, and d psi / d final states
        grads = [f.grad for f in finals]
        for i in reversed(range(self.sm.n_layers)):
            with self.sm.block(i) as layer:
                for c, sink in enumerate(records):
                    _, args, kwargs = sink[i]
                    h = states[c][i].detach().requires_grad_(True)
                    out = layer(h, *args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    torch.autograd.backward(out, grads[c])
                    grads[c] = h.grad
        return psi.detach(), gaps.detach()

    def close(self) -> None:
        self.hooks.remove()


def task_entropy(engine, phi: dict[str, torch.Tensor], task: Task) -> float:
    """Token-weighted mean entropy over all of a task's batches at the given phi."""
    total, count = 0.0, 0
    for batch in task.batches:
        s, n = engine.entropy(phi, batch)
        total, count = total + s, count + n
    return total / max(count, 1)


def train_coefficients(
    engine: InMemory | Streamed,
    directions: dict[str, Directions],
    init: dict[str, torch.Tensor],
    tasks: Sequence[Task],
    *,
    preference: Sequence[float],
    objective: str = "stch",
    alpha: float = 1.0,
    steps: int = 500,
    lr: float = 1e-3,
    expand: Callable[[dict], dict[str, torch.Tensor]] | None = None,
    what: str = "tara",
    quiet: bool = False,
) -> TrainingResult:
    """Learn the coefficients minimising Psi; see the module docstring.

    ``init`` holds the free parameters; ``expand`` turns them into every
    module's phi (None: they are the phi, TARA's case). Tied coefficients (a
    gate shared by all of an adapter's directions, by a layer, or by the whole
    model) are free parameters that ``expand`` repeats.
    """
    from tqdm import tqdm

    device = engine.device
    expand = expand or (lambda params: params)
    rho = torch.tensor(list(preference), dtype=torch.float32, device=device)
    free = {k: nn.Parameter(p.to(device).clone()) for k, p in init.items()}
    z = [
        task_entropy(
            engine, {m: d.single(i).to(device) for m, d in directions.items()}, task
        )
        for i, task in enumerate(tasks)
    ]
    with torch.no_grad():
        h_before = [task_entropy(engine, expand(free), t) for t in tasks]
    optimizer = torch.optim.AdamW(list(free.values()), lr=lr)
    baseline = torch.tensor(z, device=device)
    history: list[dict] = []
    bar = tqdm(range(steps), desc=f"{what} ({engine.mode})", disable=quiet)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        batches = [task.batches[step % len(task.batches)] for task in tasks]
        psi, gaps = engine.step(expand(free), batches, baseline, rho, objective, alpha)
        if not torch.isfinite(psi):
            raise TadaError(
                f"{what}: the objective became {float(psi)} at step {step} "
                f"({_first_bad(free) or 'coefficients still finite'})"
            )
        optimizer.step()
        if bad := _first_bad(free):
            raise TadaError(f"{what}: at step {step}, {bad}")
        history.append({"step": step, "psi": float(psi), "gaps": gaps.tolist()})
        bar.set_postfix(psi=f"{float(psi):.4f}")
    with torch.no_grad():
        learned = {m: p.detach().clone() for m, p in expand(free).items()}
        h_after = [task_entropy(engine, learned, t) for t in tasks]
    return TrainingResult(
        phi={m: p.cpu() for m, p in learned.items()},
        z=z,
        h_before=h_before,
        h_after=h_after,
        history=history,
        params={k: p.detach().cpu() for k, p in free.items()},
    )


def _first_bad(phi: dict[str, torch.Tensor]) -> str | None:
    for module, p in phi.items():
        if not torch.isfinite(p).all() or (
            p.grad is not None and not torch.isfinite(p.grad).all()
        ):
            return f"the coefficients of {module} went non-finite"
    return None


# --------------------------------------------------------------------- TARA's run

CAUSAL_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LearnedCoefficients:
    """TARA's context for merging: the directions and what was learned."""

    variant: str
    labels: list[str]  # inputs, config order
    preference: list[float]  # rho, summing to 1
    directions: dict[str, Directions]  # base module name -> directions
    result: TrainingResult
    settings: dict
    data: dict[str, dict]  # label -> {path, rows, tokens}
    cache: dict  # key, hit


def check_causal_lm(base_path: str, what: str = "tara") -> None:
    """Learning from next-token entropies needs a base with an LM head."""
    import json
    import os

    with open(os.path.join(base_path, "config.json"), encoding="utf-8") as fh:
        model_type = json.load(fh).get("model_type")
    if model_type not in CAUSAL_LM_TYPES:
        raise TadaError(
            f"{what}: base model {base_path} is a {model_type!r} model; learning from "
            "next-token entropies needs a causal language model with an LM head "
            f"({', '.join(CAUSAL_LM_TYPES)})"
        )


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def choose_mode(
    base_files: Sequence[str], device: torch.device, requested: str, what: str
) -> str:
    """In memory when a float32 copy of the base fits in half the available memory.

    ``requested`` ("memory" or "streamed") overrides; the choice is logged.
    """
    from safetensors import safe_open

    params = 0
    for path in base_files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as fh:
                for key in fh.keys():
                    params += math.prod(fh.get_slice(key).get_shape())
    need = 4 * params
    available = _available_memory() if device.type == "cpu" else None
    if requested != "auto":
        mode = requested
    else:
        mode = "memory" if available is None or need <= 0.5 * available else "streamed"
    known = f"{available / 1e9:.1f} GB available" if available else "memory unknown"
    LOG.warning(
        "%s: training %s (float32 base %.2f GB, %s)",
        what,
        "in memory" if mode == "memory" else "block-streamed",
        need / 1e9,
        known,
    )
    return mode


def load_causal_lm(base_path: str, device: torch.device) -> nn.Module:
    """The base as a transformers causal LM in float32 (TARA needs next-token logits)."""
    from transformers import AutoModelForCausalLM

    from mergekit_tada.loading import transformers_errors_only

    with transformers_errors_only():
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = model.to(device)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
            # into torch's aligned memory (see LoraAdapter.factors); ties hold,
            # parameters() yields a shared weight once
            tensor.data = tensor.data.clone()
    return model


def read_tasks(
    base_path: str,
    sources: list[tuple[str, str, str]],
    samples: int,
    max_length: int,
    batch_size: int,
) -> tuple[list[Task], dict[str, dict], str]:
    """Tokenized unlabeled text per input: (name, path, what) -> Task.

    Returns the tasks, a description per input (path, rows, tokens) and a
    digest of every token id used (for cache keys).
    """
    from mergekit_tada.probe.calibration import (
        batches_digest,
        make_batches,
        token_count,
        tokenizer_for,
    )
    from mergekit_tada.texts import read_texts

    tokenizer = tokenizer_for(base_path)
    tasks, described = [], {}
    for name, path, what in sources:
        texts = read_texts(path, what)[:samples]
        batches = make_batches(tokenizer, texts, max_length, batch_size)
        tasks.append(Task(name, batches))
        described[name] = {
            "path": path,
            "rows": len(texts),
            "tokens": token_count(batches),
        }
    digest = batches_digest([b for t in tasks for b in t.batches])
    return tasks, described, digest


def module_directions(run, plans: list, labels: list[str], variant: str) -> dict:
    """One set of directions per base module, inputs in ``labels`` order.

    Computed once, in one thread, and reused by the merge: a basis recomputed
    under other thread counts could differ in the last bits.
    """
    from mergekit_tada.methods.tara import directions

    modules: dict[str, list] = {}
    for plan in plans:
        names = [m for m in plan.sources.values() if m]
        modules.setdefault(names[0], [plan.sources[label] for label in labels])
    with single_thread():
        return {
            module: directions(
                [
                    run.adapters[label].factors(source) if source else None
                    for label, source in zip(labels, sources, strict=True)
                ],
                variant,
            )
            for module, sources in sorted(modules.items())
        }


def train_or_cached(
    run,
    kind: str,
    key_parts: dict,
    dirs: dict,
    init: dict[str, torch.Tensor],
    tasks: list[Task],
    settings: dict,
    preference: list[float],
    expand=None,
    what: str = "tara",
) -> tuple[TrainingResult, dict]:
    """The cached result for these inputs, or train (and cache) it."""
    from mergekit_tada.cache import ContentCache

    cache = ContentCache(settings["cache_dir"])
    key = cache.key(
        {
            "kind": kind,
            "adapters": {label: a.hashes for label, a in run.adapters.items()},
            "base": cache.file_hashes(run.base_files),
            "device": torch.device(run.device).type,
            "preference": preference,
            **key_parts,
        }
    )
    payload = cache.load(key, kind)
    if payload is not None and set(payload.get("phi", {})) == set(dirs):
        try:
            result = TrainingResult(
                phi={m: torch.tensor(v) for m, v in payload["phi"].items()},
                z=payload["z"],
                h_before=payload["h_before"],
                h_after=payload["h_after"],
                history=payload["history"],
                params={k: torch.tensor(v) for k, v in payload["params"].items()},
            )
            return result, {"key": key, "hit": True}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            LOG.warning("ignoring unusable cache entry %s (%s)", key[:12], error)
    device = torch.device(run.device)
    mode = choose_mode(run.base_files, device, settings["training_mode"], what)
    if mode == "memory":
        engine = InMemory(load_causal_lm(run.base_path, device), dirs, device)
    else:
        engine = Streamed(run.base_path, dirs, device)
    try:
        result = train_coefficients(
            engine,
            dirs,
            init,
            tasks,
            preference=preference,
            objective=settings["objective"],
            alpha=settings["alpha"],
            steps=settings["steps"],
            lr=settings["lr"],
            expand=expand,
            what=what,
            quiet=run.quiet,
        )
    finally:
        engine.close()
    cache.store(
        key,
        {
            "phi": {m: p.tolist() for m, p in sorted(result.phi.items())},
            "params": {k: p.tolist() for k, p in sorted(result.params.items())},
            "z": result.z,
            "h_before": result.h_before,
            "h_after": result.h_after,
            "history": result.history,
        },
        kind,
    )
    return result, {"key": key, "hit": False}


def learn_tara(
    run,
    plans: list,
    settings: dict,
    data: dict[str, str],
    preference: dict[str, float],
) -> LearnedCoefficients:
    """Read each input's data, build the directions, train phi (or read the cache).

    ``run``: the session's RunInputs; ``settings``: the shared TARA parameters;
    ``data`` and ``preference``: per input label (config order).
    """
    import json

    from mergekit_tada.methods.tara import initial_coefficients

    labels = list(run.adapters)
    check_causal_lm(run.base_path)
    total = sum(preference.values())
    rho = [preference[label] / total for label in labels]
    tasks, described, tokens = read_tasks(
        run.base_path,
        [
            (label, data[label], f"tara: data of models[{i}] ({label})")
            for i, label in enumerate(labels)
        ],
        settings["data_samples"],
        settings["max_length"],
        settings["batch_size"],
    )
    dirs = module_directions(run, plans, labels, settings["variant"])
    init_lambda = settings["init_lambda"]
    if init_lambda is None:
        init_lambda = 0.4 * len(labels)
    init = {
        m: initial_coefficients(d, init_lambda, len(labels)) for m, d in dirs.items()
    }
    # the training mode changes no result (the gradients are the same)
    kept = {
        k: v for k, v in settings.items() if k not in ("cache_dir", "training_mode")
    }
    result, cache = train_or_cached(
        run,
        "tara",
        {"tokens": tokens, "settings": kept | {"init_lambda": init_lambda}},
        dirs,
        init,
        tasks,
        settings,
        rho,
    )
    return LearnedCoefficients(
        variant=settings["variant"],
        labels=labels,
        preference=rho,
        directions=dirs,
        result=result,
        settings=json.loads(json.dumps(settings)) | {"init_lambda": init_lambda},
        data=described,
        cache=cache,
    )


@dataclass
class LearnedGates:
    """TaDA's learned gates: (w_T, w_D) per module, and how they were learned."""

    gates: dict[str, tuple[float, float]]  # base module -> (task gate, domain gate)
    granularity: str
    result: TrainingResult
    data: dict[str, dict]
    settings: dict
    cache: dict
    labels: list[str] = field(default_factory=lambda: ["task", "domain"])


def gate_group(module: str, granularity: str) -> str:
    """The key of the gate pair a module shares: itself, its layer, or all."""
    from mergekit_tada.probe.gates import layer_of

    if granularity == "global":
        return "all"
    if granularity == "layer":
        return layer_of(module)
    return module


def learn_gates(
    run,
    plans: list,
    settings: dict,
    roles: dict[str, str],
    uniform: float,
) -> LearnedGates:
    """Train TaDA's two gates per group with TARA's objective (one loop).

    The data: ``task_calibration`` (task-style prompts) for the task adapter
    and ``calibration`` (domain prompts) for the domain adapter; each z_i is
    the entropy of that adapter alone on its own prompts. The gates start at
    the uniform gate (task arithmetic 1/1 with the default scale) and are
    shared by every direction of an adapter in a group (module, layer or
    global).
    """
    check_causal_lm(run.base_path, "tada learned gates")
    labels = sorted(roles, key=lambda label: ("task", "domain").index(roles[label]))
    tasks, described, tokens = read_tasks(
        run.base_path,
        [
            ("task", settings["task_calibration"], "tada: task_calibration"),
            ("domain", settings["calibration"], "tada: calibration"),
        ],
        settings["calibration_samples"],
        settings["calibration_max_length"],
        settings["calibration_batch_size"],
    )
    dirs = module_directions(run, plans, labels, "a")
    granularity = settings["gate_granularity"]
    groups = {m: gate_group(m, granularity) for m in dirs}
    init = {g: torch.tensor([uniform, uniform]) for g in sorted(set(groups.values()))}
    owners = {m: torch.tensor(d.owners) for m, d in dirs.items()}

    def expand(params: dict) -> dict[str, torch.Tensor]:
        return {
            m: params[groups[m]][owners[m].to(params[groups[m]].device)] for m in dirs
        }

    kept = {
        k: v for k, v in settings.items() if k not in ("cache_dir", "training_mode")
    }
    result, cache = train_or_cached(
        run,
        "gates",
        {"tokens": tokens, "settings": kept, "uniform": uniform},
        dirs,
        init,
        tasks,
        settings,
        [0.5, 0.5],
        expand=expand,
        what="tada learned gates",
    )
    gates = {m: tuple(float(v) for v in result.params[groups[m]]) for m in dirs}
    return LearnedGates(gates, granularity, result, described, settings, cache)


def plot_training(learned: LearnedCoefficients, path) -> None:
    """Psi and each H_i - z_i over the steps (``tara_loss.png``)."""
    from matplotlib.figure import Figure

    history = learned.result.history
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(9, 3.6))
    fig.subplots_adjust(left=0.08, right=0.72, bottom=0.15, top=0.86, wspace=0.3)
    left, right = fig.subplots(1, 2)
    left.plot(steps, [h["psi"] for h in history], color="black")
    left.set_title(f"objective ({learned.settings['objective']})")
    left.set_xlabel("step")
    for i, label in enumerate(learned.labels):
        right.plot(steps, [h["gaps"][i] for h in history], label=label)
    right.set_title("H_i - z_i per input")
    right.set_xlabel("step")
    right.axhline(0.0, color="grey", linewidth=0.5)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"TARA-{learned.variant.upper()} training")
    fig.savefig(path, dpi=100, metadata={"Software": None})
