"""Compose: route a new task's inputs, then merge the selected adapters.

Writes an ordinary mergekit YAML (``compose.yml``: the method, the base, each
selected adapter as ``base+adapter`` with its retrieved weight, absolute
paths) and runs exactly that configuration, so ``mergekit-yaml compose.yml
OUT`` reproduces the merge bit for bit. ``compose.yml`` and ``retrieval.json``
(the routing: per query neighbours per adapter, scores, distribution,
nucleus; the final weights) are outputs of the same run: they appear with the
merge or not at all.

A nucleus of one adapter is written with the runner-up at weight 0 (the
methods take two or more inputs); the merge is then that adapter's update.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import yaml

from mergekit_tada.adapters import WEIGHTS_NAME
from mergekit_tada.errors import TadaError
from mergekit_tada.files import sha256_file
from mergekit_tada.retrieval.route import Routing


def check_method(method: str) -> None:
    from mergekit_tada.methods.registry import FAMILY

    if method not in FAMILY:
        raise TadaError(
            f"compose: method must be one of {', '.join(FAMILY)} (got {method!r})"
        )


def compose_config(
    routing: Routing,
    method: str = "lora_task_arithmetic",
    rank: int | None = None,
    dtype: str | None = None,
) -> str:
    """The mergekit YAML of the composed merge."""
    check_method(method)
    chosen = list(routing.weights.items())
    if len(chosen) == 1:
        runner_up = next(
            (
                n
                for n, _ in sorted(routing.distribution.items(), key=lambda kv: -kv[1])
                if n != chosen[0][0]
            ),
            None,
        )
        if runner_up is None:
            raise TadaError("compose: the library holds one adapter; nothing to merge")
        chosen.append((runner_up, 0.0))
    base = routing.base_model
    models = []
    for name, weight in chosen:
        path = routing.adapters.get(name)
        if not path or not os.path.isdir(path):
            raise TadaError(
                f"compose: adapter {name} of the library is not at {path}; update "
                "its path in the library file and run index again (the rows are kept)"
            )
        indexed = routing.adapter_hashes.get(name)
        if indexed and indexed != sha256_file(os.path.join(path, WEIGHTS_NAME)):
            raise TadaError(
                f"compose: adapter {name} ({path}) changed since it was indexed: "
                "run index again"
            )
        models.append(
            {"model": f"{base}+{path}", "parameters": {"weight": round(weight, 10)}}
        )
    config: dict = {"merge_method": method, "base_model": base, "models": models}
    if rank:
        config["parameters"] = {"rank": rank}
    if dtype:
        config["dtype"] = dtype
    header = (
        "# Composed by mergekit-tada compose: retrieval-weighted adapters "
        "(details in retrieval.json).\n"
        "# Reproduce with: mergekit-yaml compose.yml OUT\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def compose(
    routing: Routing,
    out_path: str | os.PathLike,
    method: str = "lora_task_arithmetic",
    adapter_only: bool = False,
    rank: int | None = None,
    dtype: str | None = None,
    **options,
) -> str:
    """Merge the routed adapters into out_path; returns it."""
    from mergekit_tada.api import merge

    text = compose_config(routing, method, rank, dtype)
    report = json.dumps(asdict(routing), indent=2, sort_keys=True) + "\n"
    return merge(
        text,
        out_path,
        adapter_only=adapter_only,
        extra_files={"compose.yml": text, "retrieval.json": report},
        **options,
    )
