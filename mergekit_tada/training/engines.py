"""The forward engines that train coefficients: the base whole, or block by block.

Every LoRA'd linear gets a forward hook that adds the factored update for the
current coefficients,

    y = W x + B @ sum_g (phi_g * (A_g x))        (never a dense dW)

so only phi trains (the base's weights are frozen). ``InMemory`` runs autograd
through the whole model; ``Streamed`` reads one block at a time
(mergekit_tada/streaming.py, shared with the probe's calibration pass) for
models larger than memory, with the same gradients (tested). phi's gradient,
a sum over tokens, runs on one torch thread on the CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from mergekit_tada.batches import Batch
from mergekit_tada.directions import Directions
from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import single_thread
from mergekit_tada.streaming import StreamedModel
from mergekit_tada.training.objective import entropy_sum, objective_value

LOG = logging.getLogger(__name__)

TRAINING_MODES = ("auto", "memory", "streamed")


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
            states = self.sm.forward_blocks(
                records, [sink[0][0] for sink in records], keep_all=True
            )
        return records, states

    def _head(self, batch: Batch, final: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The stem's tail and the LM head on the last states: entropy sum, count."""
        batch = batch.to(self.device)
        logits = self.sm.tail(batch, final, head=True).logits
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
    LOG.info(
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
