"""Seconds per TARA training step against a plain PEFT forward + backward.

Side by side in one process, alternating: (1) one step of TARA's loop in
memory (training.InMemory: every task's batch through the frozen base with
the coefficient hooks, the objective, backward, AdamW on phi); (2) PEFT with
the same adapters loaded and both active, only the LoRA parameters trainable,
forward + backward of the same token batches with the same entropy loss, and
an AdamW step; (3) with --streamed, the same TARA step block-streamed
(training.Streamed: blocks re-read from the safetensors forward and backward).
The in-memory ratio is the target (<= 1.3x).

    python bench/tara_step.py DIR [--variant b] [--batch 4] [--length 64] [--steps 3] [--streamed]

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
    ap.add_argument("--streamed", action="store_true")
    args = ap.parse_args()

    from peft import PeftModel

    from mergekit_tada.adapters import LoraAdapter
    from mergekit_tada.methods.tara import directions, initial_coefficients
    from mergekit_tada.probe.calibration import Batch
    from mergekit_tada.training import (
        InMemory,
        Streamed,
        Task,
        _forward_entropy,
        load_causal_lm,
    )

    ap_streamed = args.streamed
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
    model = load_causal_lm(base, cpu)
    vocab = model.config.vocab_size

    def batch() -> Batch:
        ids = torch.randint(3, vocab, (args.batch, args.length), generator=gen)
        return Batch(ids, torch.ones_like(ids), {})

    tasks = [Task(n, [batch()]) for n in names]
    batches = [t.batches[0] for t in tasks]
    engines = {"memory": InMemory(model, dirs, cpu)}
    if ap_streamed:
        engines["streamed"] = Streamed(base, dirs, cpu)
    phi = {m: torch.nn.Parameter(p.clone()) for m, p in init.items()}
    opt_phi = torch.optim.AdamW(list(phi.values()), lr=1e-3)
    z, rho = torch.tensor([3.0, 3.0]), torch.tensor([0.5, 0.5])

    def tara_step(engine) -> None:
        opt_phi.zero_grad()
        engine.step(phi, batches, z, rho, "stch", 1.0)
        opt_phi.step()

    peft_model = load_causal_lm(base, cpu)
    peft_model = PeftModel.from_pretrained(peft_model, str(args.dir / "lora-a"), "a")
    peft_model.load_adapter(str(args.dir / "lora-b"), "b")
    peft_model.base_model.set_adapter(["a", "b"])
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-3)

    def peft_step() -> None:
        losses = []
        for b in batches:
            s, n = _forward_entropy(peft_model, b, cpu)
            losses.append(s / n)
        loss = torch.stack(losses).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {k: [] for k in [*engines, "peft"]}
    for _ in range(args.steps):
        for name, engine in engines.items():
            start = time.perf_counter()
            tara_step(engine)
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        peft_step()
        times["peft"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    line = (
        f"{args.dir.name}, variant {args.variant}, {len(tasks)} tasks x batch "
        f"{args.batch} x {args.length} tokens, {torch.get_num_threads()} threads: "
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
