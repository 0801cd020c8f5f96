"""Index a library: each adapter's sample rows, embedded, into the Chroma collection.

An index run is a unit. It holds an exclusive lock on an embedded store (a
server's concurrent runs are told apart by the run id on every row), marks the
collection ``indexing`` until it finishes (route and compose refuse a marked
library, naming the adapters), and checks at the end that each adapter it
wrote has exactly its own rows. An adapter's fingerprint covers its files'
content hashes, the row texts and how they were built; one whose fingerprint,
row count and rows' run match the record is skipped (its path updated: a moved
adapter is the same adapter). A changed one has its record dropped first, its
rows deleted and the new rows inserted in batches under Chroma's maximum batch
size. Adapters no longer in the library are deleted. The base is known by its
content (config.json and tensor headers), so a moved base keeps its library.
Row ids are deterministic (``name:row``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from mergekit_tada.adapters import WEIGHTS_NAME, LoraAdapter
from mergekit_tada.errors import TadaError
from mergekit_tada.loading import HeaderIndex
from mergekit_tada.retrieval.library import Library, LibraryEntry, load_library
from mergekit_tada.retrieval.store import Embedder, Store, library_state, save_state
from mergekit_tada.run.names import align_names
from mergekit_tada.texts import read_texts

LOG = logging.getLogger(__name__)
INDEX_LOCK = ".mergekit-tada-index.lock"


@dataclass
class IndexSummary:
    indexed: list[str]  # adapters (re)embedded this run
    skipped: list[str]  # unchanged
    removed: list[str]  # no longer in the library
    rows: int  # rows in the collection afterwards


def entry_texts(entry: LibraryEntry, max_rows: int) -> list[str]:
    """The rows to embed: hint + the text fields (no gold answers unless listed)."""
    texts = read_texts(
        entry.samples,
        f"library entry {entry.name}: samples",
        fields=entry.text_fields,
        separator=" | ",
        limit=max_rows,
    )
    return [f"{entry.hint}: {t}" if entry.hint else t for t in texts]


def check_entry(entry: LibraryEntry, base: HeaderIndex, base_path: str) -> LoraAdapter:
    """The entry's adapter, checked to sit on the library's base (shapes)."""
    if "+" in entry.path:
        raise TadaError(
            f"library entry {entry.name}: adapter path {entry.path} contains '+', "
            "which mergekit reads as base+adapter when composing; rename the folder"
        )
    if not os.path.isdir(entry.path):
        raise TadaError(
            f"library entry {entry.name}: adapter {entry.path}: no such folder"
        )
    adapter = LoraAdapter(entry.path)
    align_names({entry.name: adapter}, base.index.tensor_paths)  # a classifier's
    for module, spec in adapter.modules.items():
        name = base.resolve([module + ".weight"])
        shape = base.meta(name)[0] if name else None
        if shape != [spec.out_features, spec.in_features]:
            raise TadaError(
                f"library entry {entry.name}: adapter {entry.path}: module {module} "
                f"does not fit base model {base_path} ({shape}): trained on another base?"
            )
    return adapter


def fingerprint(adapter: LoraAdapter, entry: LibraryEntry, texts: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(adapter.hashes, sort_keys=True).encode())
    digest.update(json.dumps([entry.text_fields, entry.hint, texts]).encode())
    return digest.hexdigest()


def base_identity(base: HeaderIndex, base_path: str) -> str:
    """The base by content: its config.json and every tensor's name, shape and
    dtype (a moved base is the same base; a retrained one is not)."""
    digest = hashlib.sha256()
    with open(os.path.join(base_path, "config.json"), "rb") as fh:
        digest.update(fh.read())
    for name in sorted(base.index.tensor_paths):
        digest.update(json.dumps([name, *base.meta(name)[:2]], default=str).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive(store: Store) -> Iterator[None]:
    """One index run at a time on an embedded store (a lock file beside it); a
    server's runs are told apart by the run id every row carries."""
    if store.host:
        yield
        return
    os.makedirs(store.db, exist_ok=True)
    fd = os.open(os.path.join(store.db, INDEX_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise TadaError(
                f"adapter library {store.where} is being indexed by another run "
                f"(pid {holder or 'unknown'}); wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def index_library(
    library: str | os.PathLike | Library,
    store: Store,
    embedder: Embedder | None = None,
    quiet: bool = False,
) -> IndexSummary:
    """Embed every adapter's samples into the store's collection (see module doc)."""
    if not isinstance(library, Library):
        library = load_library(library)
    embedder = embedder or Embedder(quiet=quiet)
    if not os.path.isdir(library.base_model):
        raise TadaError(f"library base_model {library.base_model}: no such folder")
    base = HeaderIndex(library.base_model)
    prepared = []
    for entry in library.adapters:  # validate everything before touching the store
        adapter = check_entry(entry, base, library.base_model)
        texts = entry_texts(entry, library.max_rows)
        prepared.append((entry, adapter, texts, fingerprint(adapter, entry, texts)))
    identity = base_identity(base, library.base_model)
    with exclusive(store):
        client, collection = store.open(embedder, create=True)
        try:
            return _index(
                library, store, embedder, client, collection, prepared, identity, quiet
            )
        except TadaError:
            raise
        except Exception as error:  # a server gone mid-run, a store turned unreadable
            raise store.unreadable(error) from None


def row_runs(collection, name: str) -> list:
    """The run id of every row of one adapter (None for rows of older versions)."""
    found = collection.get(where={"adapter": name}, include=["metadatas"])
    return [m.get("run") for m in found["metadatas"]]


def _index(library, store, embedder, client, collection, prepared, identity, quiet):
    """The run itself: marked incomplete until every adapter's rows are its own."""
    from tqdm import tqdm

    metadata = collection.metadata or {}
    recorded_base = metadata.get("base_model")
    if recorded_base not in (None, library.base_model):
        if metadata.get("base_identity") != identity:
            raise TadaError(
                f"adapter library {store.where} holds adapters on {recorded_base}, "
                f"not {library.base_model}: use another --db or --collection"
            )
        LOG.info("base model moved: %s -> %s", recorded_base, library.base_model)
    base_meta = {"base_model": library.base_model, "base_identity": identity}
    state = library_state(collection)
    wanted = {entry.name for entry, *_ in prepared}
    present = {m["adapter"] for m in collection.get(include=["metadatas"])["metadatas"]}
    removed = sorted((set(state) | present) - wanted)
    todo, skipped = [], []
    for entry, adapter, texts, fp in prepared:
        record = state.get(entry.name)
        runs = row_runs(collection, entry.name)
        if (
            record
            and record["fingerprint"] == fp
            and record["rows"] == len(runs) == len(texts)
            and set(runs) == {record.get("run")}
        ):
            record["path"] = entry.path  # moved adapters: same content, new place
            skipped.append(entry.name)
        else:
            todo.append((entry, adapter, texts, fp))
    run = uuid.uuid4().hex
    marker = json.dumps(
        {"run": run, "pid": os.getpid(), "adapters": [e.name for e, *_ in todo]}
    )
    for name in [*removed, *(e.name for e, *_ in todo)]:
        state.pop(name, None)  # not trusted until its rows are complete
    save_state(collection, state, indexing=marker, **base_meta)
    for name in removed:
        collection.delete(where={"adapter": name})
    batch = client.get_max_batch_size()
    for entry, adapter, texts, fp in todo:
        collection.delete(where={"adapter": entry.name})
        vectors = embedder.encode(texts)
        sha = adapter.hashes[WEIGHTS_NAME]
        bar = tqdm(
            total=len(texts), desc=f"Indexing {entry.name}", disable=quiet, unit="row"
        )
        for start in range(0, len(texts), batch):
            stop = min(start + batch, len(texts))
            collection.add(
                ids=[f"{entry.name}:{i:06d}" for i in range(start, stop)],
                embeddings=vectors[start:stop],
                documents=texts[start:stop],
                metadatas=[
                    {
                        "adapter": entry.name,
                        "adapter_sha256": sha,
                        "source": entry.samples,
                        "row": i,
                        "run": run,
                    }
                    for i in range(start, stop)
                ],
            )
            bar.update(stop - start)
        bar.close()
        state[entry.name] = {
            "fingerprint": fp,
            "rows": len(texts),
            "path": entry.path,
            "sha256": sha,
            "run": run,
        }
    for entry, _, texts, _ in todo:  # rows of one adapter come from this run only
        runs = row_runs(collection, entry.name)
        if len(runs) != len(texts) or set(runs) != {run}:
            raise TadaError(
                f"adapter library {store.where}: another index run changed adapter "
                f"{entry.name} while this one ran; run index again"
            )
    save_state(collection, state, indexing="", **base_meta)
    return IndexSummary(
        [e.name for e, *_ in todo], skipped, removed, collection.count()
    )
