"""Calibration statistics in the content cache (``stats-<key>.json`` entries)."""

from __future__ import annotations

from pathlib import Path

from mergekit_tada.cache import DEFAULT_CACHE_DIR, ContentCache
from mergekit_tada.probe.calibration import ModuleStats, Stats

__all__ = ["DEFAULT_CACHE_DIR", "StatsCache"]


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
