"""The architectures the test matrix checks (tests/test_architectures.py), as
data: the README's "Supported models" table is rendered from it
(:func:`supported_table`), and a test holds the two equal, so the table says
what the matrix proves.

Each row: transformers' ``model_type``, the kind of model (decoder, encoder,
MoE decoder), the LoRA targets the matrix trains (PEFT's ``all-linear``, or
the attention projections where PEFT's ``all-linear`` reaches the fused
experts), and whether the streamed methods run (else: refused in one line).
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Arch:
    model_type: str
    kind: str  # decoder | encoder | moe
    targets: str | tuple[str, ...] = "all-linear"
    streamed: bool = True
    note: str = ""


ARCHS = (
    Arch("llama", "decoder"),
    Arch("mistral", "decoder"),
    Arch("qwen2", "decoder"),
    Arch("qwen3", "decoder"),
    Arch("gemma", "decoder"),
    Arch("gemma2", "decoder"),
    Arch("gemma3_text", "decoder"),
    Arch("phi", "decoder"),
    Arch("phi3", "decoder"),
    Arch("olmo2", "decoder"),
    Arch("granite", "decoder"),
    Arch("starcoder2", "decoder"),
    Arch("stablelm", "decoder"),
    Arch("cohere", "decoder"),
    Arch("gpt_neox", "decoder"),
    Arch("falcon", "decoder"),
    Arch("gpt2", "decoder", note="Conv1D LoRAs (`fan_in_fan_out: true`)"),
    Arch(
        "mixtral",
        "moe",
        ATTENTION,
        note="expert LoRAs (`target_parameters`) refused",
    ),
    Arch(
        "qwen3_moe",
        "moe",
        ATTENTION,
        note="as mixtral",
    ),
    Arch("bert", "encoder"),
    Arch("roberta", "encoder"),
    Arch("xlm-roberta", "encoder"),
    Arch("distilbert", "encoder"),
)


def supported_table() -> str:
    """The README's table: architecture x (data-free, streamed, full model)."""
    rows = [
        "| architecture | data-free methods | streamed methods (RegMean, `lambda: auto`, probe) | full model (`mergekit-yaml`) | notes |",
        "|---|---|---|---|---|",
    ]
    for a in ARCHS:
        lora = "attention LoRAs" if a.kind == "moe" else "yes"
        streamed = "yes" if a.streamed else "no (one-line error)"
        rows.append(f"| `{a.model_type}` | {lora} | {streamed} | {lora} | {a.note} |")
    return "\n".join(rows) + "\n"
