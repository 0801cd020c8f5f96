"""Seconds per TARA training step against a plain PEFT forward + backward.

Side by side in one process, alternating: (1) one step of TARA's loop
(training.py: every task's batch through the frozen base with the coefficient
hooks, the objective, backward, AdamW on phi); (2) PEFT with the same adapters
loaded and both active, only the LoRA parameters trainable, forward + backward
of the same token batches with the same entropy loss, and an AdamW step. The
ratio is the target (<= 1.3x).

    python bench/tara_step.py DIR [--variant b] [--batch 4] [--length 64] [--steps 3]

DIR holds base/, lora-a/, lora-b/ from bench/generate.py. Prints medians.
"""

import argparse
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
    args = ap.parse_args()

    from peft import PeftModel

    from mergekit_tada.adapters import LoraAdapter
    from mergekit_tada.methods.tara import directions, initial_coefficients
    from mergekit_tada.probe.calibration import Batch
    from mergekit_tada.training import (
        Task,
        _forward_entropy,
        load_causal_lm,
        train_coefficients,
    )

    base = str(args.dir / "base")
    names = ["lora-a", "lora-b"]
    adapters = [LoraAdapter(args.dir / n) for n in names]
    dirs = {
        m: directions([a.factors(m) for a in adapters], args.variant)
        for m in adapters[0].modules
    }
    init = {m: initial_coefficients(d, 0.8, 2) for m, d in dirs.items()}
    gen = torch.Generator().manual_seed(0)
    vocab = load_causal_lm(base, torch.device("cpu")).config.vocab_size

    def batch() -> Batch:
        ids = torch.randint(3, vocab, (args.batch, args.length), generator=gen)
        return Batch(ids, torch.ones_like(ids), {})

    tasks = [Task(n, [batch()]) for n in names]
    model = load_causal_lm(base, torch.device("cpu"))

    peft_model = load_causal_lm(base, torch.device("cpu"))
    peft_model = PeftModel.from_pretrained(peft_model, str(args.dir / "lora-a"), "a")
    peft_model.load_adapter(str(args.dir / "lora-b"), "b")
    peft_model.base_model.set_adapter(["a", "b"])
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-3)

    def peft_step() -> None:
        losses = []
        for task in tasks:
            s, n = _forward_entropy(peft_model, task.batches[0], torch.device("cpu"))
            losses.append(s / n)
        loss = torch.stack(losses).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def tara_steps(k: int) -> float:
        start = time.perf_counter()
        train_coefficients(
            model, dirs, init, tasks, preference=[0.5, 0.5], steps=k, quiet=True
        )
        return time.perf_counter() - start

    # TARA's cost per step: (k+1 steps - 1 step) / k removes the fixed z and
    # before/after evaluations from the measurement
    ours, theirs = [], []
    for _ in range(args.steps):
        one = tara_steps(1)
        more = tara_steps(3)
        ours.append((more - one) / 2)
        start = time.perf_counter()
        peft_step()
        theirs.append(time.perf_counter() - start)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(
        f"{args.dir.name}, variant {args.variant}, {len(tasks)} tasks x batch "
        f"{args.batch} x {args.length} tokens, {torch.get_num_threads()} threads: "
        f"TARA step {a:.3f} s, PEFT forward+backward {b:.3f} s, ratio {a / b:.2f} "
        f"(median of {args.steps})"
    )


if __name__ == "__main__":
    main()
