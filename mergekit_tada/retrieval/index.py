"""Index a library: each adapter's sample rows, embedded, into the Chroma collection.

Idempotent and safe to interrupt. An adapter's fingerprint covers its files'
content hashes, the row texts and how they were built; an adapter whose
fingerprint and row count match the collection's record is skipped. A changed
one has its record dropped first, its rows deleted, the new rows inserted in
batches under Chroma's maximum batch size, and only then its record written:
a run killed in between leaves no record, so the next run redoes that adapter
whole. Adapters no longer in the library are deleted. Row ids are
deterministic (``name:row``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.errors import TadaError
from mergekit_tada.loading import HeaderIndex
from mergekit_tada.retrieval.library import Library, LibraryEntry, load_library
from mergekit_tada.retrieval.store import Embedder, Store, library_state, save_state
from mergekit_tada.texts import read_texts

LOG = logging.getLogger(__name__)


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
    if not os.path.isdir(entry.path):
        raise TadaError(
            f"library entry {entry.name}: adapter {entry.path}: no such folder"
        )
    adapter = LoraAdapter(entry.path)
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


def index_library(
    library: str | os.PathLike | Library,
    store: Store,
    embedder: Embedder | None = None,
    quiet: bool = False,
) -> IndexSummary:
    """Embed every adapter's samples into the store's collection (see module doc)."""
    from tqdm import tqdm

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
    client, collection = store.open(embedder, create=True)
    recorded_base = (collection.metadata or {}).get("base_model")
    if recorded_base not in (None, library.base_model):
        raise TadaError(
            f"adapter library {store.where} holds adapters on {recorded_base}, not "
            f"{library.base_model}: use another --db or --collection"
        )
    state = library_state(collection)
    wanted = {entry.name for entry, *_ in prepared}
    present = {m["adapter"] for m in collection.get(include=["metadatas"])["metadatas"]}
    removed = sorted((set(state) | present) - wanted)
    for name in removed:
        state.pop(name, None)
        save_state(collection, state, base_model=library.base_model)
        collection.delete(where={"adapter": name})
    batch = client.get_max_batch_size()
    indexed, skipped = [], []
    for entry, adapter, texts, fp in prepared:
        record = state.get(entry.name)
        rows = len(collection.get(where={"adapter": entry.name}, include=[])["ids"])
        if (
            record
            and record["fingerprint"] == fp
            and record["rows"] == rows == len(texts)
        ):
            skipped.append(entry.name)
            continue
        state.pop(entry.name, None)  # not trusted until its rows are complete
        save_state(collection, state, base_model=library.base_model)
        collection.delete(where={"adapter": entry.name})
        vectors = embedder.encode(texts)
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
                        "adapter_sha256": adapter.hashes["adapter_model.safetensors"],
                        "source": entry.samples,
                        "row": i,
                    }
                    for i in range(start, stop)
                ],
            )
            bar.update(stop - start)
        bar.close()
        state[entry.name] = {"fingerprint": fp, "rows": len(texts), "path": entry.path}
        save_state(collection, state, base_model=library.base_model)
        indexed.append(entry.name)
    return IndexSummary(indexed, skipped, removed, collection.count())
