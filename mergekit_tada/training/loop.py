"""The one loop that learns merge coefficients, and its cache.

AdamW (torch's defaults beyond ``lr``: betas (0.9, 0.999), weight decay 0.01)
on the free parameters only; step k uses batch k mod n_i of every task (no
sampling). The objective is training/objective.py's, the forward passes an
engine's (training/engines.py). Results are cached by content: the adapters'
and base's hashes, the token ids, the settings and the device type.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mergekit_tada.batches import (
    Batch,
    batches_digest,
    make_batches,
    token_count,
    tokenizer_for,
)
from mergekit_tada.cache import ContentCache
from mergekit_tada.directions import Directions
from mergekit_tada.errors import TadaError
from mergekit_tada.texts import read_texts
from mergekit_tada.training.engines import (
    InMemory,
    Streamed,
    choose_mode,
    load_causal_lm,
)

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
        # The engine differentiates Psi by every module's phi as leaves; the
        # tie from the free parameters to phi (expand) is backpropagated once
        # here. An engine may run several backward passes per step (the
        # streamed one: one per block), which a shared expand graph would not
        # survive.
        phi = expand(free)
        leaves = {m: p.detach().requires_grad_(True) for m, p in phi.items()}
        psi, gaps = engine.step(leaves, batches, baseline, rho, objective, alpha)
        if not torch.isfinite(psi):
            raise TadaError(
                f"{what}: the objective became {float(psi)} at step {step} "
                f"({_first_bad(free) or 'coefficients still finite'})"
            )
        used = [m for m, leaf in leaves.items() if leaf.grad is not None]
        if used:
            torch.autograd.backward(
                [phi[m] for m in used], [leaves[m].grad for m in used]
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
    tokenizer = tokenizer_for(base_path, sources[0][2] if sources else "training")
    tasks, described = [], {}
    for name, path, what in sources:
        texts = read_texts(path, what)[:samples]
        batches = make_batches(
            tokenizer, texts, max_length, batch_size, f"{what} {path}"
        )
        tasks.append(Task(name, batches))
        described[name] = {
            "path": path,
            "rows": len(texts),
            "tokens": token_count(batches),
        }
    digest = batches_digest([b for t in tasks for b in t.batches])
    return tasks, described, digest


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
    cache = ContentCache(settings["cache_dir"])
    key = cache.inputs_key(
        run.adapters,
        run.base_files,
        run.device,
        {"kind": kind, "preference": preference, **key_parts},
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
