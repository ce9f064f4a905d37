"""Retrieval speed: one call = encode the preference + fuse it in the TRM + faiss top-20.

Reports p50/p99 latency at batch 1 and calls/s at batch 64, on the embedded ml-100k catalogue and on
a synthetic 1,000,000-item catalogue (clustered random item vectors of the TRM's width), exact vs
approximate search, with the approximate index's recall@20 against exact; for each text-encoder
backend (``torch``, and ``onnx`` = onnxruntime, from the ``fast`` extra), with the top-20 overlap of
each backend's results with the torch backend's.

    python -m benchmarks.retrieval_speed             # ~3 min on a 2-core CPU
    python -m benchmarks.retrieval_speed --smoke     # seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import markdown_table, publish
from deeprec_env.cli import device_option, positive_int
from deeprec_env.index import IndexConfig, ItemIndex
from deeprec_env.retrieval import Retriever
from deeprec_env.threads import thread_settings

COLUMNS = [
    "catalogue",
    "index",
    "encoder backend",
    "build_s",
    "p50_ms (batch 1)",
    "p99_ms (batch 1)",
    "calls/s (batch 64)",
    "search only p50_ms",
    "recall@20 vs exact",
    "top-20 overlap vs torch backend",
]
PHRASES = [
    "light comedies",
    "dark thrillers",
    "90s romance",
    "animated family films",
    "war dramas",
    "sci-fi adventures",
    "crime stories",
    "musicals",
    "documentaries about music",
    "westerns",
]


def queries(n: int, rng: np.random.Generator) -> list[str]:
    """Distinct preference texts, so that no call is served from the encoder's cache."""
    return [f"{PHRASES[rng.integers(len(PHRASES))]}; {PHRASES[rng.integers(len(PHRASES))]} #{i}" for i in range(n)]


def clustered_vectors(n: int, d: int, rng: np.random.Generator, clusters: int = 2000) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (row 0 = padding)."""
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    v = np.empty((n + 1, d), dtype=np.float32)
    v[0] = 0
    for s in range(1, n + 1, 200_000):
        e = min(n + 1, s + 200_000)
        x = centres[rng.integers(0, clusters, e - s)] + 0.5 * rng.normal(size=(e - s, d)).astype(np.float32)
        v[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return v


def measure(retriever: Retriever, histories, rng, n_single: int, n_batches: int, batch: int = 64) -> dict:
    prefs = queries(n_single + n_batches * batch + 5, rng)
    for i in range(5):  # warm-up
        retriever.retrieve([histories[i % len(histories)]], [prefs.pop()], k=20)
    lat = []
    for i in range(n_single):
        t = time.perf_counter()
        retriever.retrieve([histories[i % len(histories)]], [prefs.pop()], k=20)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    for b in range(n_batches):
        hs = [histories[(b * batch + j) % len(histories)] for j in range(batch)]
        retriever.retrieve(hs, [prefs.pop() for _ in range(batch)], k=20)
    thr = n_batches * batch / (time.perf_counter() - t)
    q = retriever.user_vectors(histories[:n_single], None)
    search = []
    for i in range(len(q)):
        t = time.perf_counter()
        retriever.index.search(q[i : i + 1], 20)
        search.append(time.perf_counter() - t)
    return {
        "search only p50_ms": 1e3 * float(np.median(search)),
        "p50_ms (batch 1)": 1e3 * float(np.median(lat)),
        "p99_ms (batch 1)": 1e3 * float(np.quantile(lat, 0.99)),
        "calls/s (batch 64)": float(thr),
    }


def shared_fraction(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Mean fraction of items two ``(n, k)`` top-``k`` id arrays have in common, row by row."""
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(x, y, strict=True)]))


def recall_vs_exact(exact: ItemIndex, approx: ItemIndex, q: np.ndarray, k: int = 20) -> float:
    return shared_fraction(approx.search(q, k)[0], exact.search(q, k)[0], k)


def overlap(a: Retriever, b: Retriever, histories, prefs: list[str], k: int = 20) -> float:
    """Mean fraction of shared items between two retrievers' top-``k`` for the same queries."""
    return shared_fraction(a.retrieve(histories, prefs, k)[0], b.retrieve(histories, prefs, k)[0], k)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-items", type=positive_int, default=1_000_000, help="size of the synthetic large catalogue")
    ap.add_argument("--single", type=positive_int, default=200, help="batch-1 calls timed")
    ap.add_argument("--batches", type=positive_int, default=10, help="batch-64 calls timed")
    ap.add_argument("--hnsw", action="store_true", help="also build HNSW on the large catalogue (slow build)")
    ap.add_argument("--ivf-nprobe", type=positive_int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", type=device_option, default="cpu")
    ap.add_argument("--encoder", default="minilm", help="text encoder: 'minilm' (embedded), a path or a hub id")
    ap.add_argument("--backends", default="torch,onnx", help="encoder backends, comma-separated (onnx needs [fast])")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    from deeprec_env.data import load_dataset, synthetic
    from deeprec_env.embed import TextEncoder
    from deeprec_env.trm import TRMConfig

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or backends[0] != "torch":
        raise SystemExit("--backends must start with torch (the reference the others are compared with)")
    encs = {b: TextEncoder(args.encoder, device=args.device, backend=b) for b in backends}
    enc = encs["torch"]
    if args.smoke:
        from deeprec_env.trm import train_trm

        ds = synthetic(60, 40, seed=args.seed)
        trm, _ = train_trm(ds, TRMConfig(d_model=16, ffn_dim=32, max_len=12, max_epochs=1), enc, progress=False)
        base = Retriever(trm, enc)
        args.n_items, args.single, args.batches = 5000, 10, 2
    else:
        ds = load_dataset("ml-100k")
        base = Retriever.for_dataset(ds, TRMConfig(device=args.device), enc)
    test = ds.split("test")
    histories = [test.history(i, base.max_len) for i in range(len(test))]
    check = queries(100, np.random.default_rng(args.seed + 1))
    check_h = [histories[i % len(histories)] for i in range(len(check))]
    rows = []

    def add(catalogue: str, index_name: str, build: float, r: Retriever, backend: str, recall: float) -> None:
        ref = Retriever(base.trm, enc, index=r.index)
        rows.append(
            {
                "catalogue": catalogue,
                "index": index_name,
                "encoder backend": backend,
                "build_s": build,
                **measure(r, histories, rng, args.single, args.batches),
                "recall@20 vs exact": recall,
                "top-20 overlap vs torch backend": overlap(r, ref, check_h, check),
            }
        )
        print(rows[-1])

    for b in backends:
        add(f"{ds.name} ({ds.n_items:,} items)", "exact (IndexFlatIP)", 0.0, Retriever(base.trm, encs[b]), b, 1.0)

    vectors = clustered_vectors(args.n_items, base.index.dim, rng)
    probe = vectors[rng.integers(1, args.n_items + 1, 200)] + 0.05 * rng.normal(size=(200, base.index.dim))
    probe = (probe / np.linalg.norm(probe, axis=1, keepdims=True)).astype(np.float32)
    kinds = [
        ("exact (IndexFlatIP)", IndexConfig(), backends[:1]),
        (f"IVF (nlist 1024, nprobe {args.ivf_nprobe})", IndexConfig(kind="ivf", ivf_nlist=1024,
                                                                    ivf_nprobe=args.ivf_nprobe), backends),
    ]  # fmt: skip
    if args.hnsw:
        kinds.append(("HNSW (M 32, efSearch 64)", IndexConfig(kind="hnsw"), backends))
    exact = None
    for name, cfg, bs in kinds:
        t = time.perf_counter()
        index = ItemIndex(vectors, cfg)
        build = time.perf_counter() - t
        exact = exact or index
        recall = recall_vs_exact(exact, index, probe)
        for b in bs:
            r = Retriever(base.trm, encs[b], index=index)
            add(f"synthetic ({args.n_items:,} items)", name, build, r, b, recall)
    protocol = {
        "call": f"encode preference ({args.encoder}, distinct texts, no cache hits) + TRM forward + fusion + "
        "faiss top-20",
        "encoder backends": f"{', '.join(backends)} (torch: transformers eager PyTorch; onnx: the same model "
        "exported once and run by onnxruntime, CPU, float32)",
        "top-20 overlap": "100 (history, preference) queries, same index: mean shared fraction of each backend's "
        "top-20 with the torch backend's",
        "batch 1": f"{args.single} calls, p50/p99 wall time",
        "batch 64": f"{args.batches} batches of 64 calls, calls per second",
        "search only": "faiss top-20 for one precomputed query vector (no encoding, no TRM)",
        "large catalogue": f"{args.n_items:,} synthetic item vectors (2000 Gaussian clusters, unit norm), "
        "searched with the ml-100k TRM's query path",
        "recall@20": "200 probe queries near random items, approximate top-20 vs exact top-20",
        "faiss threads": 1,
        "torch threads": f"{thread_settings()['torch threads (process)']} (the process's; the retriever is called "
        "directly, not through an env)",
        "seed": args.seed,
    }
    table = markdown_table(rows, COLUMNS, fmt="{:.2f}")
    publish("retrieval_speed", "Retrieval speed", table, protocol, {"rows": rows}, args.smoke, args.out)


if __name__ == "__main__":
    main()
