"""The calibration passes of a merge, read from the content cache or run and stored.

Entries are ``stats-<key>.json``; a key covers what a pass depends on: the
adapters' and the base's file hashes, the prompts and their token ids, the
pass settings (``PASS_KEYS``) and the device type, so gate-only settings
never recalibrate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from mergekit_tada.batches import (
    batches_digest,
    make_batches,
    token_count,
    tokenizer_for,
)
from mergekit_tada.cache import ContentCache
from mergekit_tada.probe.calibration import (
    CALIBRATION_PASS_VERSION,
    PASS_KEYS,
    ModuleStats,
    Stats,
    check_statistics,
    read_prompts,
    run_calibration,
)

LOG = logging.getLogger(__name__)


class StatsCache(ContentCache):
    """Stats (adapter label -> module -> ModuleStats) as cache payloads."""

    def load_stats(self, key: str) -> Stats | None:
        payload = self.load(key, "stats")
        if payload is None:
            return None
        fields = set(vars(ModuleStats()))
        try:
            if any(
                set(s) != fields
                for modules in payload.values()
                for s in modules.values()
            ):
                return None  # an entry of another version (fields added since)
            return {
                label: {m: ModuleStats(**s) for m, s in modules.items()}
                for label, modules in payload.items()
            }
        except (TypeError, AttributeError):
            return None

    def store_stats(self, key: str, stats: Stats) -> Path | None:
        payload = {
            label: {m: vars(s) for m, s in sorted(modules.items())}
            for label, modules in sorted(stats.items())
        }
        return self.store(key, payload, "stats")


def calibrate(
    settings: dict,
    base_path: str,
    base_files: list[str],
    adapters: dict,
    device: torch.device,
    quiet: bool,
) -> tuple[dict[str, Stats], dict]:
    """Every pass in ``settings["passes"]`` (prompt set -> prompts file), each
    from the cache or computed and stored: (prompt set -> statistics, what the
    report says of the calibration)."""
    tokenizer = tokenizer_for(base_path, "tada: calibration (gates: probe or learned)")
    cache = StatsCache(settings["cache_dir"])
    # what every pass depends on besides its own prompts (gate-only
    # settings would only miss)
    common = {
        "settings": {k: settings[k] for k in PASS_KEYS},
        "pass": CALIBRATION_PASS_VERSION,
    }
    stats, infos = {}, []
    for prompts, path in settings["passes"].items():
        texts = read_prompts(path, settings["calibration_samples"])
        batches = make_batches(
            tokenizer,
            texts,
            settings["calibration_max_length"],
            settings["calibration_batch_size"],
            f"tada: {'task_calibration' if prompts == 'task' else 'calibration'} {path}",
        )
        key = cache.inputs_key(
            adapters,
            base_files,
            device,
            common
            | {
                "texts": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
                "tokens": batches_digest(batches),
            },
        )
        found = cache.load_stats(key)
        hit = found is not None
        if not hit:
            found = run_calibration(
                base_path, batches, adapters, device=device, quiet=quiet
            )
            check_statistics(found, base_path)
            cache.store_stats(key, found)
            LOG.info("calibration statistics computed (cache key %s)", key[:12])
        else:  # said once: the calibration pass was skipped, and why
            LOG.info(
                "calibration statistics from cache entry %s (no calibration pass)",
                cache.entry_path(key),
            )
        stats[prompts] = found
        infos.append(
            {
                "path": path,
                "prompts": len(texts),
                "tokens": token_count(batches),
                "max_length": settings["calibration_max_length"],
                "cache_key": key,
                "cache_hit": hit,
            }
        )
    info = infos[0]
    if len(infos) > 1:
        info["task_prompts"] = infos[1]
    return stats, info
