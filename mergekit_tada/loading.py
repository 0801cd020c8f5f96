"""How mergekit's loader sees our inputs without reading or materializing them.

mergekit turns every ``base+lora`` input into a full model on disk before it
plans anything. For our methods the LoRA inputs are read as factors by the
merge run instead, so the loader is handed a :class:`PlaceholderLoader`: it has
the base model's tensor index (so planning, optional weights and aliases work
unchanged) and returns zero-stride placeholders of the right shape and dtype,
which cost no I/O and no memory (integer buffers, a few bytes, are read).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator

import torch
from mergekit.io import ShardedTensorIndex
from safetensors import safe_open

from mergekit_tada.errors import TadaError


class HeaderIndex:
    """Shapes and dtypes of a safetensors model, read from headers only."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.index = ShardedTensorIndex.from_disk(path)
        except Exception as error:
            raise TadaError(f"{path}: cannot index base model ({error})") from None
        if not self.index.is_safetensors:
            raise TadaError(
                f"{path}: LoRA inputs need a safetensors base model "
                "(convert pytorch_model.bin with transformers' save_pretrained)"
            )
        self._meta: dict[str, tuple[list[int], torch.dtype]] = {}
        self._lock = threading.Lock()

    def resolve(self, names: list[str]) -> str | None:
        return next((n for n in names if n in self.index.tensor_paths), None)

    def read(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        chunk_bytes: int = 1 << 25,
    ) -> torch.Tensor:
        """Read one tensor, converted to ``dtype`` on ``device`` row chunk by row chunk.

        Converting a whole bf16 embedding to float32 at once would hold both
        copies; chunks keep the overhead to ``chunk_bytes``.
        """
        shard = os.path.join(self.path, self.index.tensor_paths[name])
        with safe_open(shard, framework="pt") as fh:
            sl = fh.get_slice(name)
            shape = sl.get_shape()
            if dtype is None or len(shape) < 2:
                # a copy in torch's aligned memory (see LoraAdapter.factors)
                return fh.get_tensor(name).to(device=device, dtype=dtype, copy=True)
            out = torch.empty(shape, dtype=dtype, device=device)
            row_bytes = max(1, out[0].numel() * out.element_size())
            step = max(1, chunk_bytes // row_bytes)
            for start in range(0, shape[0], step):
                # copy_ converts in place: no converted temporary per chunk
                out[start : start + step].copy_(sl[start : start + step])
            return out

    def meta(self, name: str) -> tuple[list[int], torch.dtype]:
        with self._lock:
            if name not in self._meta:
                shard = os.path.join(self.path, self.index.tensor_paths[name])
                try:
                    with safe_open(shard, framework="pt") as fh:
                        for key in fh.keys():
                            sl = fh.get_slice(key)
                            self._meta[key] = (sl.get_shape(), _dtype(sl.get_dtype()))
                except Exception as error:
                    raise TadaError(
                        f"{shard}: unreadable safetensors ({error})"
                    ) from None
            return self._meta[name]


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype(name: str) -> torch.dtype:
    return _DTYPES.get(name, torch.float32)


class PlaceholderLoader:
    """Duck-types mergekit's LazyTensorLoader for a ``base+lora`` input."""

    def __init__(self, headers: HeaderIndex, float_dtype: torch.dtype | None) -> None:
        self.headers = headers
        self.index = headers.index
        self.float_dtype = float_dtype

    def get_tensor(
        self,
        key: str,
        device: str = "cpu",
        aliases: list[str] | None = None,
        raise_on_missing: bool = True,
    ) -> torch.Tensor | None:
        name = self.headers.resolve([key, *(aliases or [])])
        if name is None:
            if raise_on_missing:
                raise KeyError(key)
            return None
        shape, dtype = self.headers.meta(name)
        if not dtype.is_floating_point:
            # Integer buffers (position ids) must equal the base's: mergekit
            # checks that inputs agree. They are tiny, so read them.
            return self.headers.read(name, device=device)
        return torch.zeros((), dtype=self.float_dtype or dtype, device=device).expand(
            shape
        )

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def transformers_errors_only() -> Iterator[None]:
    """Silence transformers' warnings and progress bars for a call of ours."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", category=FutureWarning, module="transformers"
            )
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
