"""Seconds per TARA training step against a plain PEFT forward + backward.

Side by side in one process, alternating: (1) one step of TARA's loop in
memory (training.InMemory: every task's batch through the frozen base with
the coefficient hooks, the objective, backward, AdamW on phi); (2) PEFT with
the same adapters loaded and both active, only the LoRA parameters trainable,
forward + backward of the same token batches with the same entropy loss, and
an AdamW step; (3) with --streamed, the same TARA step block-streamed
(training.Streamed: blocks re-read from the safetensors forward and backward).
The in-memory ratio is the target (<= 1.3x). ``--sequential`` measures one
side after the other (each holds its own float32 copy of the base: two at
once do not fit for the medium model on 24 GB).

    python bench/tara_step.py DIR [--variant b] [--batch 4] [--length 64] [--steps 3] [--streamed]

DIR holds base/, lora-a/, lora-b/ from bench/generate.py. Prints medians.
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--variant", default="b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--streamed", action="store_true")
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="one side at a time (each loads its own float32 base)",
    )
    args = ap.parse_args()

    from peft import PeftModel

    from mergekit_tada.adapters import LoraAdapter
    from mergekit_tada.batches import Batch
    from mergekit_tada.directions import directions, initial_coefficients
    from mergekit_tada.training.engines import (
        InMemory,
        Streamed,
        _forward_entropy,
        load_causal_lm,
    )
    from mergekit_tada.training.loop import Task

    cpu = torch.device("cpu")
    base = str(args.dir / "base")
    names = ["lora-a", "lora-b"]
    adapters = [LoraAdapter(args.dir / n) for n in names]
    dirs = {
        m: directions([a.factors(m) for a in adapters], args.variant)
        for m in adapters[0].modules
    }
    init = {m: initial_coefficients(d, 0.8, 2) for m, d in dirs.items()}
    gen = torch.Generator().manual_seed(0)
    vocab = json.loads((args.dir / "base" / "config.json").read_text())["vocab_size"]

    def batch() -> Batch:
        ids = torch.randint(3, vocab, (args.batch, args.length), generator=gen)
        return Batch(ids, torch.ones_like(ids), {})

    tasks = [Task(n, [batch()]) for n in names]
    batches = [t.batches[0] for t in tasks]
    z, rho = torch.tensor([3.0, 3.0]), torch.tensor([0.5, 0.5])

    def tara(engine):
        phi = {m: torch.nn.Parameter(p.clone()) for m, p in init.items()}
        opt = torch.optim.AdamW(list(phi.values()), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            engine.step(phi, batches, z, rho, "stch", 1.0)
            opt.step()

        return step

    def peft():
        model = PeftModel.from_pretrained(
            load_causal_lm(base, cpu), str(args.dir / "lora-a"), "a"
        )
        model.load_adapter(str(args.dir / "lora-b"), "b")
        model.base_model.set_adapter(["a", "b"])
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

        def step() -> None:
            losses = []
            for b in batches:
                s, n = _forward_entropy(model, b, cpu)
                losses.append(s / n)
            opt.zero_grad()
            torch.stack(losses).sum().backward()
            opt.step()

        return step

    sides = {
        "memory": lambda: tara(InMemory(load_causal_lm(base, cpu), dirs, cpu)),
        "peft": peft,
    }
    if args.streamed:
        sides["streamed"] = lambda: tara(Streamed(base, dirs, cpu))
    times: dict[str, list[float]] = {k: [] for k in sides}

    def timed(name: str, step) -> None:
        start = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - start)

    if args.sequential:  # one side in memory at a time (large models)
        for name, make in sides.items():
            step = make()
            for _ in range(args.steps):
                timed(name, step)
            del step
            gc.collect()
    else:
        steps = {name: make() for name, make in sides.items()}
        for _ in range(args.steps):
            for name, step in steps.items():
                timed(name, step)
    med = {k: statistics.median(v) for k, v in times.items()}
    line = (
        f"{args.dir.name}, variant {args.variant}, {len(tasks)} tasks x batch "
        f"{args.batch} x {args.length} tokens, {torch.get_num_threads()} threads"
        f"{', sides one after another' if args.sequential else ''}: "
        f"TARA step {med['memory']:.3f} s, PEFT forward+backward {med['peft']:.3f} s, "
        f"ratio {med['memory'] / med['peft']:.2f}"
    )
    if "streamed" in med:
        line += (
            f"; streamed TARA step {med['streamed']:.3f} s "
            f"({med['streamed'] / med['memory']:.2f}x in memory)"
        )
    print(line + f" (median of {args.steps})")


if __name__ == "__main__":
    main()
