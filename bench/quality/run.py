"""The quality benchmark: one command, three world seeds, every baseline and ablation.

    .venv/bin/python bench/quality/run.py            # build (cached) + score + docs
    .venv/bin/python bench/quality/run.py --seeds 0  # one world
    .venv/bin/python bench/quality/run.py --world quiet  # small-perturbation worlds

Worlds are built once under bench/work/quality/ (seed-N; quiet-seed-N for
--world quiet; delete to rebuild); merges are re-run and re-scored on every
call (about a minute per seed). Writes docs/quality-results.md,
docs/quality.json and docs/quality-gates.png (quality-quiet-* for quiet).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_tada.methods.registry import FAMILY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from world import (  # noqa: E402
    WORLDS,
    World,
    WorldSpec,
    build,
    update_sizes,
    world_root,
)

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "bench" / "work" / "quality"
DOCS = REPO / "docs"
SETS = ("combined", "task", "domain")


# ------------------------------------------------------------------- scoring


def score(model, tokenizer, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Greedy exact match of the whole answer, and its mean log-likelihood per word.

    Prompts of one set have one length (one-token names), so a set is one batch.
    """
    x = torch.tensor([tokenizer(p)["input_ids"] for p, _ in pairs])
    y = torch.tensor([tokenizer(a)["input_ids"] for _, a in pairs])
    n = y.shape[1]
    with torch.no_grad():
        generated = x
        for _ in range(n):
            nxt = model(input_ids=generated).logits[:, -1].argmax(-1, keepdim=True)
            generated = torch.cat([generated, nxt], 1)
        exact = (generated[:, -n:] == y).all(1).float().mean().item()
        logits = model(input_ids=torch.cat([x, y], 1)).logits[:, x.shape[1] - 1 : -1]
        loglik = logits.log_softmax(-1).gather(-1, y[..., None]).mean().item()
    return {"exact": 100 * exact, "loglik": loglik}


# -------------------------------------------------------------------- merges


@dataclass
class Ctx:
    root: Path
    seed: int
    world: World
    out: Path
    timings: dict = field(default_factory=dict)

    @property
    def base(self) -> str:
        return str(self.root / "base")

    def lora(self, name: str) -> str:
        return str(self.root / f"lora-{name}")


def load_base(ctx: Ctx):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ctx.base, dtype=torch.float32).eval()


def with_adapter(ctx: Ctx, adapter: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(ctx), adapter).eval()


def ours(
    method: str,
    params: dict | None = None,
    *,
    domain_adapter: str = "domain",
    **per_model,
):
    """A merge with one of our methods (adapter-only, loaded back through PEFT)."""

    def run(ctx: Ctx, name: str):
        import mergekit_tada

        models = []
        for role, adapter in (("task", "task"), ("domain", domain_adapter)):
            p = dict(per_model.get(role, {}))
            if method == "tada":
                p["role"] = role
            if method == "tara":  # each adapter's own unlabeled text
                p["data"] = str(ctx.root / f"{role}-data.txt")
            models.append({"model": f"{ctx.base}+{ctx.lora(adapter)}", "parameters": p})
        shared = {}
        if method == "tada":  # probe gates named: the default is uniform
            shared["gates"] = "probe"
            shared["calibration"] = str(ctx.root / "calibration.txt")
            shared["task_calibration"] = str(ctx.root / "task-calibration.txt")
        if method in ("tada", "tara"):
            shared["cache_dir"] = str(ctx.root / "cache")
        config = {
            "merge_method": method,
            "base_model": ctx.base,
            "models": models,
            "parameters": shared | (params or {}),
            "dtype": "float32",
        }
        out = ctx.out / name
        mergekit_tada.merge(
            config, out, adapter_only=True, random_seed=ctx.seed, quiet=True
        )
        return with_adapter(ctx, str(out / "adapter"))

    return run


def stock(method: str, **params):
    """mergekit's own kernel over ``base+lora`` inputs (full model out)."""

    def run(ctx: Ctx, name: str):
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
        from transformers import LlamaForCausalLM

        config = MergeConfiguration.model_validate(
            {
                "merge_method": method,
                "base_model": ctx.base,
                "models": [
                    {"model": f"{ctx.base}+{ctx.lora(a)}", "parameters": dict(params)}
                    for a in ("task", "domain")
                ],
                "dtype": "float32",
            }
        )
        out = ctx.out / name
        options = MergeOptions(
            lora_merge_cache=str(ctx.out / "lora-cache"),
            random_seed=ctx.seed,
            quiet=True,
        )
        run_merge(config, str(out), options=options)
        return LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()

    return run


def peft(combination: str):
    """PEFT's add_weighted_adapter with weights 1, 1."""

    def run(ctx: Ctx, name: str):
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            load_base(ctx), ctx.lora("task"), adapter_name="task"
        )
        model.load_adapter(ctx.lora("domain"), adapter_name="domain")
        model.add_weighted_adapter(
            ["task", "domain"], [1.0, 1.0], "merged", combination_type=combination
        )
        model.set_adapter("merged")
        return model.eval()

    return run


def reference(adapter: str | None):
    def run(ctx: Ctx, name: str):
        return (
            load_base(ctx) if adapter is None else with_adapter(ctx, ctx.lora(adapter))
        )

    return run


TIES = {"weight": 1.0, "density": 0.5}
# Each tada ablation runs at the default lambda (scale) = 2, where the gates
# sum to 2 (uniform gates = task arithmetic 1/1), and at lambda = 1 (gates sum
# to 1: an average of the adapters, the default before this benchmark).
TADA_ABLATIONS = {
    "": {},
    " + Pico": {"pico": True},
    " uniform gates": {"gates": "uniform"},
    " per-layer gates": {"gate_granularity": "layer"},
    " no conflict elimination": {"conflict_elimination": False},
    " kappa 0.1": {"conflict_threshold": 0.1},
    " kappa 0.5": {"conflict_threshold": 0.5},
    " tau 0.5": {"tau": 0.5},
    " tau 2": {"tau": 2.0},
    " N=8": {"calibration_samples": 8},
    " N=128": {"calibration_samples": 128},
    " raw activation norm": {"probe_statistic": "raw"},
    " per-type centring": {"probe_centring": "type"},
    " task-prompt probe": {"probe_prompts": "task"},
    " contrast probe": {"probe_prompts": "contrast"},
    " probe balance": {"probe_balance": "equalise"},
    " clip 0.3-0.7": {"gate_min": 0.3, "gate_max": 0.7},
    " max-normalised gates": {"gate_normalization": "max"},
    " rank 16 (no truncation)": {"rank": 16},
}
TA = "lora_task_arithmetic"
# the rules with a row each, with and without Pico in front
WITH_PICO = {
    "lora_ties": TIES,
    "lora_dare_ties": TIES,
    "lora_knots_ties": TIES,
    "lora_tsv_m": {},
}
# name -> (group, builder)
VARIANTS: dict[str, tuple[str, Callable]] = {
    "base": ("reference", reference(None)),
    "task only": ("reference", reference("task")),
    "domain only": ("reference", reference("domain")),
    "joint": ("reference", reference("joint")),
    "task arithmetic 0.5/0.5": (
        "baseline",
        ours(TA, task={"weight": 0.5}, domain={"weight": 0.5}),
    ),
    "task arithmetic 1/1": ("baseline", ours(TA)),
    "mergekit ties (base+lora)": ("baseline", stock("ties", **TIES)),
    "mergekit dare_ties (base+lora)": ("baseline", stock("dare_ties", **TIES)),
    "PEFT linear": ("baseline", peft("linear")),
    "PEFT cat": ("baseline", peft("cat")),
    "PEFT svd": ("baseline", peft("svd")),
    **{
        f"{method}{' + Pico' if pico else ''}": (
            "baseline",
            ours(method, {"pico": pico}, task=extra, domain=extra),
        )
        for method, extra in WITH_PICO.items()
        for pico in (False, True)
    },
    **{  # the rest of mergekit's and PEFT's fusion family, exact in dW
        method: ("baseline", ours(method, task=TIES, domain=TIES))
        for method in FAMILY
        if method != TA and method not in WITH_PICO
    },
    "tada (probe gates)": ("tada", ours("tada")),
    **{
        f"tada (learned gates, {granularity})": (
            "tada",
            ours("tada", {"gates": "learned", "gate_granularity": granularity}),
        )
        for granularity in ("global", "layer", "module")
    },
    **{
        f"tara-{variant.upper()} ({objective})": (
            "tara",
            ours("tara", {"variant": variant, "objective": objective}),
        )
        for variant in ("a", "b")
        for objective in ("stch", "linear")
    },
    **{
        f"tada{suffix}{tag}": ("ablation", ours("tada", params | lam))
        for tag, lam in (("", {}), (" (λ=1)", {"scale": 1.0}))
        for suffix, params in TADA_ABLATIONS.items()
        if suffix or lam
    },
    "tada, domain B x4": ("rescale", ours("tada", domain_adapter="domain-x4")),
    "tada raw norm, domain B x4": (
        "rescale",
        ours("tada", {"probe_statistic": "raw"}, domain_adapter="domain-x4"),
    ),
    "tada, domain B x4 in the deeper half": (
        "rescale",
        ours("tada", domain_adapter="domain-x4deep"),
    ),
    "tada raw norm, domain B x4 in the deeper half": (
        "rescale",
        ours("tada", {"probe_statistic": "raw"}, domain_adapter="domain-x4deep"),
    ),
    "task arithmetic 1/1, domain B x4": (
        "rescale",
        ours(TA, domain_adapter="domain-x4"),
    ),
}


def rescaled_adapter(ctx: Ctx, name: str, factor: float, first_layer: int = 0) -> None:
    """lora-<name>: the domain adapter with lora_B x ``factor`` in layers >= ``first_layer``."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(ctx.lora("domain")), Path(ctx.lora(name))
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    weights = load_file(str(src / "adapter_model.safetensors"))

    def scaled(key: str) -> bool:
        layer = re.search(r"layers\.(\d+)\.", key)
        return (
            "lora_B" in key and layer is not None and int(layer.group(1)) >= first_layer
        )

    weights = {k: v * factor if scaled(k) else v for k, v in weights.items()}
    save_file(
        weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    tmp.rename(dst)


# ------------------------------------------------------------------- driver


def slug(name: str) -> str:
    """A folder name for a merge."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", name).strip("_")


def run_seed(seed: int, world_name: str = "default", log=print) -> dict:
    from transformers import AutoTokenizer

    world = World.generate(WorldSpec(seed=seed, **WORLDS[world_name]))
    root = world_root(WORK, world_name, seed)
    if not (root / "world.json").exists():
        log(f"seed {seed}: building the {world_name} world")
        building = root.with_name(f".{root.name}.building")
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        build(world, building, log=log)
        building.rename(root)
    (root / "calibration.txt").write_text("\n".join(world.calibration_prompts()) + "\n")
    # learned gates: unlabeled task-style prompts (the task's format on its
    # training entities, no answers)
    (root / "task-calibration.txt").write_text(
        "\n".join(" ".join(p.split()[:-1]) for p, _ in world.task_corpus()) + "\n"
    )
    # TARA's data: each adapter's own training inputs, without answers
    (root / "task-data.txt").write_text(
        "\n".join(p for p, _ in world.task_corpus()) + "\n"
    )
    (root / "domain-data.txt").write_text(
        "\n".join(t for _, t in world.domain_corpus()) + "\n"
    )
    ctx = Ctx(root, seed, world, root / "merges")
    shutil.rmtree(ctx.out, ignore_errors=True)
    ctx.out.mkdir()
    rescaled_adapter(ctx, "domain-x4", 4.0)
    rescaled_adapter(ctx, "domain-x4deep", 4.0, first_layer=world.spec.layers // 2)
    tok = AutoTokenizer.from_pretrained(ctx.base)
    sets = world.eval_sets()
    results: dict[str, dict] = {}
    for name, (group, builder) in VARIANTS.items():
        t0 = time.perf_counter()
        model = builder(ctx, slug(name))
        row = {s: score(model, tok, sets[s]) for s in SETS}
        row["group"], row["seconds"] = group, round(time.perf_counter() - t0, 2)
        results[name] = row
        log(
            f"  seed {seed} {name:34s} "
            + "  ".join(f"{s} {row[s]['exact']:5.1f}" for s in SETS)
        )
    gates = {}
    for name in (
        "tada (probe gates)",
        "tada, domain B x4",
        "tada raw norm, domain B x4",
        "tada raw activation norm",
        "tada, domain B x4 in the deeper half",
        "tada raw norm, domain B x4 in the deeper half",
    ):
        report = json.loads((ctx.out / slug(name) / "tada_report.json").read_text())
        gates[name] = {
            m: {k: r[k] for k in ("task_gate", "domain_gate")}
            for m, r in report["modules"].items()
        }
    return {
        "world": json.loads((root / "world.json").read_text())
        | {"facts": None, "update_sizes": update_sizes(root)},
        "results": results,
        "gates": gates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--world", choices=sorted(WORLDS), default="default")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    per_seed = {seed: run_seed(seed, args.world) for seed in args.seeds}
    from report import write_docs  # noqa: PLC0415

    page = write_docs(per_seed, DOCS, wall=time.perf_counter() - t0, world=args.world)
    print(f"done in {time.perf_counter() - t0:.0f} s; wrote {page}")


if __name__ == "__main__":
    main()
