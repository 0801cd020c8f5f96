"""Several chunks of prompts through one streamed block at once, with the
bits of one chunk after another.

Each chunk runs on its own worker thread, on one torch thread (a linear over
a short chunk rounds differently at 1 and 2 torch threads on some CPUs), and
the hooks that add a chunk's share to a sum shared by chunks do so in chunk
order (:class:`ChunkOrder`): the passes' results do not depend on the number
of workers (docs/design.md, "Streamed passes").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import single_thread


class ChunkOrder:
    """Chunk order for the sums a pass's hooks add to while several chunks run
    one block at once, each on its own thread (:meth:`StreamedModel.forward_blocks`).

    A hook adds chunk c's share of a sum inside ``turn(key)``, which waits until
    every earlier chunk has added its share of ``key`` or finished the block
    without it: each sum receives its terms in chunk order, the additions (and
    so the bits) of one chunk after another on one thread, whatever the number
    of workers. Outside :meth:`StreamedModel.forward_blocks` (no chunk begun on
    this thread) a turn is taken at once.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._local = threading.local()
        self._done: dict[str, set[int]] = {}
        self._finished: set[int] = set()
        self.repeated = False  # a chunk took the same key twice

    def reset(self) -> None:
        with self._cond:
            self._done, self._finished, self.repeated = {}, set(), False

    def begin(self, chunk: int) -> None:
        self._local.chunk, self._local.taken = chunk, set()

    def finish(self) -> None:
        with self._cond:
            self._finished.add(self._local.chunk)
            self._cond.notify_all()
        self._local.chunk = None

    @contextlib.contextmanager
    def turn(self, key: str) -> Iterator[None]:
        c = getattr(self._local, "chunk", None)
        if c is None:
            yield
            return
        if key in self._local.taken:
            self.repeated = True
        with self._cond:
            done = self._done.setdefault(key, set())
            self._cond.wait_for(
                lambda: all(j in done or j in self._finished for j in range(c))
            )
        try:
            yield
        finally:
            self._local.taken.add(key)
            with self._cond:
                done.add(c)
                self._cond.notify_all()


def run_chunks(
    n: int,
    one: Callable[[int], None],
    order: ChunkOrder | None,
    workers: int,
    device: torch.device,
    what: str,
) -> None:
    """``one(c)`` for every chunk: in order on this thread, or, with ``order``
    and more than one worker, on ``workers`` threads of one torch thread each
    (a forward over chunks parallelises on two cores where one forward on two
    threads does not, and stays bit-identical), in the caller's grad mode.
    Chunk 0 runs first, alone: where it calls a hooked module twice, the turns
    could not order the sums, and the other chunks run in order here."""
    if order is None or workers == 1 or n == 1:
        for c in range(n):
            one(c)
        return
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def task(c: int) -> None:
        with (
            single_thread(device),
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
        ):
            order.begin(c)
            try:
                one(c)
            finally:
                order.finish()

    order.reset()
    task(0)
    if order.repeated:
        for c in range(1, n):
            task(c)
        return
    pool = ThreadPoolExecutor(workers)
    try:
        list(pool.map(task, range(1, n)))
    finally:
        # on an error (or Ctrl-C) the chunks not started are dropped: every
        # running chunk waits only on earlier ones, all started or done
        pool.shutdown(cancel_futures=True)
    if order.repeated:
        raise TadaError(
            f"streamed pass: {what} called a module twice in one forward of a "
            "block for some chunks only, so its sums cannot be kept in chunk "
            "order on several threads; run with --num-threads 1"
        )
