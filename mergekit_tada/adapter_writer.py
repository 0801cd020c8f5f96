"""Writing the merged PEFT adapter: streamed module by module into its final file.

The output layout is known before the merge, so each module's factors are
written the moment they exist, inside the run's stage folder
(run/folder.py), which replaces the output folder only when complete.
``adapter_config.json`` is written without peft (:func:`lora_adapter_config`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import threading
from pathlib import Path

import torch

from mergekit_tada.adapters import CONFIG_NAME, WEIGHTS_NAME

_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}


class StreamingAdapterWriter:
    """Writes a PEFT adapter folder module by module, straight into its final file.

    Every module's output rank and shape are known before the merge starts, so
    the safetensors header (keys in sorted order, deterministic whatever order
    modules finish in) is written first and each module's factors go to their
    own offsets as they arrive: one pass over the bytes, no copy. A background
    thread flushes what has been written while the merge goes on, so the final
    fsync waits only for the tail. ``out_dir`` must not exist: the writer works
    inside a run's stage folder (mergekit_tada/output.py), which is what makes
    the adapter appear whole or not at all.
    """

    FLUSH_EVERY = 32 << 20  # bytes written between background flushes

    def __init__(
        self,
        out_dir: str | os.PathLike,
        dtype: torch.dtype,
        layout: dict[str, tuple[int, int, int]],
    ) -> None:
        """``layout``: module -> (rank, out_features, in_features)."""
        self.out_dir = Path(out_dir)
        self.dtype = dtype
        self.layout = dict(layout)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        shapes = {}
        for module, (rank, out_features, in_features) in layout.items():
            prefix = f"base_model.model.{module}"
            shapes[f"{prefix}.lora_A.weight"] = [rank, in_features]
            shapes[f"{prefix}.lora_B.weight"] = [out_features, rank]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in sorted(shapes):
            size = math.prod(shapes[key]) * itemsize
            header[key] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": shapes[key],
                "data_offsets": [offset, offset + size],
            }
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._header = header
        self._data_start = 8 + len(blob)
        self.ranks: dict[str, int] = {}
        self._lock = threading.Lock()
        self._unflushed = 0
        self._complete = 0  # modules whose bytes are written
        self._background: list[threading.Thread] = []
        self._flushing: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self.out_dir.mkdir()
        self._fd: int | None = os.open(
            self.out_dir / WEIGHTS_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666
        )
        os.pwrite(self._fd, struct.pack("<Q", len(blob)) + blob, 0)
        os.ftruncate(self._fd, self._data_start + offset)

    def add(self, module: str, B: torch.Tensor, A: torch.Tensor) -> None:
        prefix = f"base_model.model.{module}"
        with self._lock:
            if module not in self.layout or module in self.ranks:
                raise RuntimeError(f"module {module} not planned or written twice")
            self.ranks[module] = A.shape[0]
        size = 0
        for key, tensor in (
            (f"{prefix}.lora_A.weight", A),
            (f"{prefix}.lora_B.weight", B),
        ):
            entry = self._header[key]
            if list(tensor.shape) != entry["shape"]:
                raise RuntimeError(
                    f"{key}: shape {list(tensor.shape)}, planned {entry['shape']}"
                )
            data = tensor.detach().to("cpu", self.dtype).contiguous()
            view = memoryview(data.view(-1).view(torch.uint8).numpy())
            size += len(view)
            position = self._data_start + entry["data_offsets"][0]
            while view:
                written = os.pwrite(self._fd, view, position)
                view, position = view[written:], position + written
        self._flush(size)

    def _flush(self, size: int) -> None:
        """Flush in the background: every FLUSH_EVERY bytes, and all once complete.

        The last module's bytes start the final fsync at once, so that during
        a full-model merge it runs beside the rest of mergekit's work (on ext4
        it also waits for mergekit's own dirty shards).
        """
        with self._lock:
            self._unflushed += size
            self._complete += 1
            if self._complete == len(self.layout):
                self._start(os.fsync, self._fd)
                return
            busy = self._flushing is not None and self._flushing.is_alive()
            if self._unflushed < self.FLUSH_EVERY or busy:
                return
            self._unflushed = 0
            self._flushing = self._start(os.fdatasync, self._fd)

    def _start(self, target, *args) -> threading.Thread:
        """Run file-system work (which releases the GIL) beside the merge."""

        def run() -> None:
            try:
                target(*args)
            except BaseException as error:  # re-raised by _close
                self._errors.append(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._background.append(thread)
        return thread

    def _close(self) -> list[BaseException]:
        """Wait for the background work, close the file; what failed there."""
        for thread in self._background:
            thread.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        return self._errors

    def abort(self) -> None:
        """Remove the partial folder (background errors give way to the caller's)."""
        self._close()
        shutil.rmtree(self.out_dir, ignore_errors=True)

    def finalize(self, config: dict) -> None:
        """Check every planned module arrived and is on disk; write the config."""
        missing = sorted(set(self.layout) - set(self.ranks))
        if missing:
            raise RuntimeError(f"modules never merged: {missing[:5]}")
        if not self.layout:  # nothing planned: no last module started the fsync
            os.fsync(self._fd)
        errors = self._close()  # waits for the final fsync
        if errors:
            raise errors[0]
        write_config(self.out_dir, config)


def write_config(folder: Path, config: dict) -> None:
    """``folder``/adapter_config.json, on disk before it returns."""
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_head_adapter(
    adapter_dir: Path,
    name: str,
    prefix: str,
    head: dict[str, torch.Tensor],
    config: dict,
) -> None:
    """``adapter_dir``/``name``: the merged LoRA (read back from ``adapter_dir``)
    under the task model's module names (``prefix`` + each module) and one
    input's head as PEFT saves ``modules_to_save``: an adapter of that input's
    task model (``config``: its adapter_config.json)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = "base_model.model."
    tensors = {}
    with safe_open(adapter_dir / WEIGHTS_NAME, framework="pt") as fh:
        for key in fh.keys():
            tensors[root + prefix + key.removeprefix(root)] = fh.get_tensor(key)
    tensors.update({root + n: t.contiguous() for n, t in head.items()})
    out = adapter_dir / name
    out.mkdir()
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    with open(out / WEIGHTS_NAME, "rb+") as fh:
        os.fsync(fh.fileno())
    write_config(out, config)


def lora_adapter_config(
    *,
    rank: int,
    target_modules: list[str],
    rank_pattern: dict[str, int],
    base_model: str,
    task_type: str | None,
    fan_in_fan_out: bool = False,
) -> dict:
    """The adapter_config.json of a merged adapter, made without importing peft.

    The fields that define a plain LoRA (alpha = r: scaling 1); PEFT gives
    every field left out its default when it loads the file. Each value is
    what ``peft.LoraConfig(...).to_dict()`` holds for the same arguments
    (``tests/test_planning.py``), so the file reads the same either way.
    """
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": dict(rank_pattern),
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
    if fan_in_fan_out:  # GPT-2's Conv1D modules (PEFT's default is false)
        config["fan_in_fan_out"] = True
    return config
