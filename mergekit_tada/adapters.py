"""Reading PEFT LoRA adapters: validated once, then factors read lazily.

An adapter folder is validated once (config flags, key layout, shapes,
finiteness) and then read one module at a time with ``safetensors.safe_open``.
Writing the merged adapter is adapter_writer.py's.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass, replace

import torch
from safetensors import safe_open

from mergekit_tada.errors import TadaError
from mergekit_tada.files import sha256_file
from mergekit_tada.lowrank import Factored

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$"
)

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Adapter-config flags whose maths the exact B @ A update does not cover.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora) adds a magnitude vector",
    "lora_bias": "LoRA biases (lora_bias) add a bias update",
    "layer_replication": "layer_replication changes the model's layers",
    "target_parameters": "target_parameters (LoRA on raw parameters, such as a "
    "MoE layer's fused experts; LoRAs on linear layers, trained with "
    "target_modules, merge)",
    "trainable_token_indices": "trainable_token_indices (trainable tokens)",
}
# PEFT's task types whose model adds a head the base lacks (modules_to_save)
# -> transformers' task model that reads it
HEAD_TASK_MODELS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def head_task_model(task_type: str):
    """transformers' auto class of the task model that reads a
    ``task_type`` adapter's head (HEAD_TASK_MODELS)."""
    import transformers

    return getattr(transformers, HEAD_TASK_MODELS[task_type])


_UNSUPPORTED_KEYS = (
    ("lora_magnitude_vector", "DoRA magnitude vector"),
    ("lora_embedding_", "embedding LoRA"),
    (".lora_B.bias", "LoRA bias"),
    ("modules_to_save", "modules_to_save entry"),
    ("trainable_tokens", "trainable tokens"),
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA'd linear module: where its factors live and how they scale."""

    name: str  # module name in the base model, e.g. model.layers.0.self_attn.q_proj
    rank: int
    scaling: float
    in_features: int
    out_features: int
    a_key: str
    b_key: str
    # fan_in_fan_out (GPT-2's Conv1D): the base weight is in x out, its
    # update (s B A)^T; the factors keep PEFT's layout (A: r x in, B: out x r)
    transposed: bool = False

    @property
    def base_shape(self) -> list[int]:
        """The shape of the base weight this module updates."""
        if self.transposed:
            return [self.in_features, self.out_features]
        return [self.out_features, self.in_features]


class LoraAdapter:
    """A validated PEFT LoRA adapter folder whose factors are read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.config_path = os.path.join(self.path, CONFIG_NAME)
        self.weights_path = os.path.join(self.path, WEIGHTS_NAME)
        self.config = self._read_config()
        # weights of modules_to_save heads (a classifier the base lacks; the
        # plan refuses copies of base modules): name in the task model -> key
        self.heads: dict[str, str] = {}
        # where the adapter names modules under its task model's base-model
        # attribute ("bert." of BertForSequenceClassification) and the base's
        # checkpoint does not: stripped here, put back in this input's head
        # adapter (run/names.align_names)
        self.prefix = ""
        self.modules = self._read_modules()
        self._fh = None
        self._lock = threading.Lock()
        self.hashes = {
            CONFIG_NAME: sha256_file(self.config_path),
            WEIGHTS_NAME: sha256_file(self.weights_path),
        }

    def __repr__(self) -> str:
        return f"LoraAdapter({self.path!r}, {len(self.modules)} modules)"

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def _read_config(self) -> dict:
        if not os.path.isdir(self.path):
            raise TadaError(f"{self.path}: adapter folder does not exist")
        if not os.path.isfile(self.config_path):
            raise TadaError(f"{self.config_path}: missing (not a PEFT adapter folder)")
        if not os.path.isfile(self.weights_path):
            raise TadaError(f"{self.weights_path}: missing adapter weights")
        try:
            with open(self.config_path, encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, json.JSONDecodeError) as error:
            raise TadaError(f"{self.config_path}: unreadable ({error})") from None
        if not isinstance(config, dict):
            raise TadaError(f"{self.config_path}: expected a JSON object")
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise TadaError(
                f"{self.config_path}: peft_type {peft_type} is not supported; "
                "only plain LoRA adapters can be merged"
            )
        for flag, what in _UNSUPPORTED_FLAGS.items():
            if config.get(flag):
                raise TadaError(
                    f"{self.config_path}: {what} is not supported "
                    f"({flag}={config[flag]!r}); only plain LoRA (W + s*B*A) merges exactly"
                )
        bias = config.get("bias", "none")
        if bias not in (None, "none"):
            raise TadaError(
                f"{self.config_path}: bias={bias!r} trains base biases; only bias='none' is supported"
            )
        if "lora_alpha" not in config or "r" not in config:
            raise TadaError(f"{self.config_path}: needs 'r' and 'lora_alpha'")
        r = config["r"]
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise TadaError(
                f"{self.config_path}: r must be a positive integer (got {r!r})"
            )
        return config

    def _open(self):
        try:
            return safe_open(self.weights_path, framework="pt")
        except Exception as error:  # safetensors raises its own error types
            raise TadaError(
                f"{self.weights_path}: not a readable safetensors file ({error})"
            ) from None

    def _handle(self):
        """One open (memory-mapped) handle for all factor reads of this adapter."""
        with self._lock:
            if self._fh is None:
                self._fh = self._open()
            return self._fh

    @staticmethod
    def _pattern_key(pattern: dict, module: str) -> str | None:
        """The ``rank_pattern``/``alpha_pattern`` key PEFT applies to a module."""
        if not pattern:  # peft's import is most of an adapter-only run's time
            return None
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(pattern.keys(), module)
        return key if key in pattern else None

    def _scaling(self, module: str, rank: int) -> float:
        alpha_pattern = self.config.get("alpha_pattern") or {}
        alpha = alpha_pattern.get(
            self._pattern_key(alpha_pattern, module), self.config["lora_alpha"]
        )
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(rank)
        return alpha / rank

    def _check_rank(self, module: str, rank: int) -> None:
        """The config's r (or rank_pattern) must be the factors' rank: s = alpha/r."""
        pattern = self.config.get("rank_pattern") or {}
        key = self._pattern_key(pattern, module)
        declared = pattern.get(key, self.config["r"])
        if declared != rank:
            where = f"rank_pattern[{key!r}]" if key is not None else "r"
            raise TadaError(
                f"{self.config_path}: {where} = {declared}, but module {module} in "
                f"{WEIGHTS_NAME} has rank {rank}; the scaling alpha/r would be wrong"
            )

    def _read_modules(self) -> dict[str, LoraModule]:
        shapes: dict[str, dict[str, tuple[str, list[int]]]] = {}
        with self._open() as fh:
            keys = list(fh.keys())
            for marker, what in _UNSUPPORTED_KEYS:
                key = next((k for k in keys if marker in k), None)
                if key is not None:
                    raise TadaError(
                        f"{self.weights_path}: {what} ({key}) is not supported; "
                        "only plain LoRA (W + s*B*A) merges exactly"
                    )
            for key in keys:
                head = self._head_weight(key)
                if head is not None:
                    self._check_float(fh, key)
                    self.heads[head] = key
                    continue
                if key.endswith(".base_layer.weight"):
                    # PEFT saves a copy of the base weight when lm_head or an
                    # embedding is targeted; the base model's own weight is used
                    # (a changed vocabulary fails the shape check of the factors).
                    continue
                match = _KEY.match(key)
                if match is None:
                    raise TadaError(
                        f"{self.weights_path}: unexpected tensor {key}; "
                        "expected <module>.lora_A.weight / <module>.lora_B.weight"
                    )
                shape = self._check_float(fh, key)
                shapes.setdefault(match["module"], {})[match["side"]] = (key, shape)
        if not shapes:
            raise TadaError(f"{self.weights_path}: contains no LoRA factors")
        modules = {}
        for name, sides in sorted(shapes.items()):
            if set(sides) != {"A", "B"}:
                raise TadaError(
                    f"{self.weights_path}: module {name} has lora_{''.join(sides)} "
                    "but not both lora_A and lora_B"
                )
            (a_key, a), (b_key, b) = sides["A"], sides["B"]
            if len(a) != 2 or len(b) != 2:
                raise TadaError(
                    f"{self.weights_path}: module {name} has {len(a)}-D factors; "
                    "only linear-layer LoRA is supported (no conv LoRA)"
                )
            if a[0] != b[1] or a[0] <= 0:
                raise TadaError(
                    f"{self.weights_path}: module {name}: lora_A {a} and lora_B {b} "
                    "do not share a rank"
                )
            self._check_rank(name, a[0])
            modules[name] = LoraModule(
                name=name,
                rank=a[0],
                scaling=self._scaling(name, a[0]),
                in_features=a[1],
                out_features=b[0],
                a_key=a_key,
                b_key=b_key,
                transposed=bool(self.config.get("fan_in_fan_out")),
            )
        return modules

    def _check_float(self, fh, key: str) -> list[int]:
        """The tensor's shape; a tensor that is not floating point fails."""
        tensor = fh.get_slice(key)
        if tensor.get_dtype() not in _FLOAT_DTYPES:
            raise TadaError(
                f"{self.weights_path}: tensor {key} is {tensor.get_dtype()}; "
                "LoRA factors must be floating point (F16, BF16, F32 or F64): "
                "dequantize the adapter first"
            )
        return tensor.get_shape()

    def _head_weight(self, key: str) -> str | None:
        """A weight of a module ``modules_to_save`` names (PEFT saves it as
        ``base_model.model.<module>.<param>``), by its name in the task model."""
        saved = self.config.get("modules_to_save") or []
        name = key.removeprefix("base_model.model.")
        if ".lora_" in name or name.endswith(".base_layer.weight"):
            return None
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):  # PEFT's match: the name ends so
            if any(".".join(parts[:i]).endswith(m) for m in saved):
                return name
        return None

    def strip_prefix(self, prefix: str) -> None:
        """Name every module without ``prefix`` (its name in the base's checkpoint)."""
        self.prefix = prefix
        self.modules = {
            name.removeprefix(prefix): replace(spec, name=name.removeprefix(prefix))
            for name, spec in self.modules.items()
        }

    def head_tensors(self, check: bool = False) -> dict[str, torch.Tensor]:
        """The head's weights as saved, by name in the task model (``check``:
        NaN/Inf fail)."""
        fh = self._handle()
        heads = {}
        for name, key in sorted(self.heads.items()):
            try:
                tensor = fh.get_tensor(key)
            except Exception as error:
                raise TadaError(
                    f"{self.weights_path}: head weight {key}: cannot read ({error})"
                ) from None
            if check and not torch.isfinite(tensor).all():
                raise TadaError(
                    f"{self.weights_path}: head weight {key} contains NaN or Inf"
                )
            heads[name] = tensor.clone()
        return heads

    def factors(
        self, module: str, device: torch.device | str = "cpu", check: bool = False
    ) -> Factored:
        """The module's update s*B*A as float32 factors (scaling folded into B).

        ``check``: fail on NaN/Inf (done once for every module by
        :meth:`check_all_finite` before a merge writes anything).
        """
        spec = self.modules[module]
        fh = self._handle()
        try:
            A = fh.get_tensor(spec.a_key)
            B = fh.get_tensor(spec.b_key)
        except Exception as error:
            raise TadaError(
                f"{self.weights_path}: module {module}: cannot read factors ({error})"
            ) from None
        for side, tensor in (("lora_A", A), ("lora_B", B)) if check else ():
            if not torch.isfinite(tensor).all():
                raise TadaError(
                    f"{self.weights_path}: module {module}: {side} contains NaN or Inf"
                )
        # copies in torch's own (64-byte aligned) memory: safetensors hands out
        # buffers at any alignment, and MKL's kernels may round differently
        # on differently aligned inputs (bits would vary from run to run)
        B = B.to(device=device, dtype=torch.float32) * spec.scaling
        return Factored(B, A.to(device=device, dtype=torch.float32, copy=True))

    def check_all_finite(self) -> None:
        """Read every factor once so corrupt data or NaN/Inf fail before any output."""
        for module in self.modules:
            self.factors(module, check=True)
        self.head_tensors(check=True)


# --------------------------------------------------------------------------- writing
