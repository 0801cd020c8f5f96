"""Several chunks through a block at once (mergekit_tada/chunks.py): the turns
give every shared sum its additions in chunk order whatever the workers' speed,
an error in one chunk surfaces (no worker left waiting), and a module called
twice in one forward falls back to one chunk after another."""

from __future__ import annotations

import time

import pytest
import torch

from mergekit_tada.chunks import ChunkOrder, run_chunks
from mergekit_tada.errors import TadaError

CPU = torch.device("cpu")


def uneven(c: int) -> None:
    time.sleep(0.002 * ((c * 7) % 5))  # later chunks often reach a turn first


def test_turns_keep_chunk_order_on_several_workers():
    order, seen = ChunkOrder(), {"a": [], "b": []}

    def one(c: int) -> None:
        for key in ("a", "b"):
            uneven(c)
            with order.turn(key):
                seen[key].append(c)

    run_chunks(16, one, order, 3, CPU, "toy")
    assert seen == {"a": list(range(16)), "b": list(range(16))}


def test_a_chunk_that_skips_a_sum_does_not_hold_the_others():
    order, seen = ChunkOrder(), []

    def one(c: int) -> None:
        uneven(c)
        if c % 3:  # chunks 0, 3, 6, ... only
            return
        with order.turn("a"):
            seen.append(c)

    run_chunks(12, one, order, 3, CPU, "toy")
    assert seen == [0, 3, 6, 9]


def test_an_error_in_a_chunk_surfaces():
    order = ChunkOrder()

    def one(c: int) -> None:
        uneven(c)
        if c == 4:
            raise ValueError("chunk 4")
        with order.turn("a"):
            pass

    with pytest.raises(ValueError, match="chunk 4"):
        run_chunks(40, one, order, 3, CPU, "toy")


def test_a_module_called_twice_runs_the_chunks_in_order():
    order, seen = ChunkOrder(), []

    def twice(c: int) -> None:
        for _ in range(2):
            uneven(c)
            with order.turn("a"):
                seen.append(c)

    run_chunks(6, twice, order, 3, CPU, "toy")
    assert seen == [c for c in range(6) for _ in range(2)]

    def later_only(c: int) -> None:
        for _ in range(1 + (c == 3)):
            with order.turn("a"):
                pass

    with pytest.raises(TadaError, match=r"toy called a module twice .*--num-threads 1"):
        run_chunks(6, later_only, order, 3, CPU, "toy")
