"""What every environment on one dataset shares: the dataset, the text encoder, the TRM, the index.

Built once per process for each :class:`ResourceConfig` (the TRM itself is cached on disk), and handed to
environments, trainers and benchmarks: ``get_resources(EnvConfig(...))`` or ``get_resources(ResourceConfig(...))``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from deeprec_env.config import check_fields, looks_like_path
from deeprec_env.data import PreprocessConfig, RecDataset, load_dataset, synthetic
from deeprec_env.index import IndexConfig
from deeprec_env.trm import TRMConfig


@dataclass(frozen=True)
class ResourceConfig:
    """The settings that decide the shared resources; the key of the per-process cache."""

    dataset: str = "ml-100k"
    """Dataset name for :func:`~deeprec_env.data.load_dataset` (ml-100k, ml-1m, amazon, atomic, synthetic)."""
    dataset_path: str | None = None
    """File or folder of the dataset (all but ml-100k and synthetic)."""
    metadata_path: str | None = None
    """Item metadata file (amazon) or .item file (atomic)."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Filtering, split and history-window settings."""
    trm: TRMConfig = field(default_factory=TRMConfig)
    """TRM settings (a cached TRM is trained on first use, about 3 min on ml-100k on a 2-core CPU)."""
    trm_checkpoint: str | None = None
    """Load this TRM checkpoint instead of the cached one."""
    encoder: str = "minilm"
    """Text encoder for items and preferences: ``minilm`` (embedded), a local path or a hub id."""
    encoder_backend: str = "torch"
    """How the encoder runs: ``torch`` or ``onnx`` (onnxruntime, CPU: faster per call; the ``fast`` extra)."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """faiss index settings."""

    def __post_init__(self) -> None:
        for name in ("dataset_path", "metadata_path", "trm_checkpoint", "encoder"):
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        check_fields(self)
        cls = type(self).__name__
        for name in ("dataset_path", "metadata_path", "trm_checkpoint"):
            value = getattr(self, name)
            if value is not None and not os.path.exists(os.path.expanduser(value)):
                raise ValueError(f"{cls}.{name}={value!r}: no such file or folder")
        if looks_like_path(self.encoder) and not os.path.isdir(os.path.expanduser(self.encoder)):
            raise ValueError(
                f"{cls}.encoder={self.encoder!r}: no such folder (a local encoder is a folder with a transformers "
                "model; a hub id looks like 'owner/name'; 'minilm' is the embedded default)"
            )


class Resources:
    """What every environment on one dataset shares: the dataset, the retriever and embeddings.

    Attributes: ``dataset``, ``retriever``, ``encoder``, ``text_emb`` (unit item text embeddings),
    and ``item_vecs`` (unit TRM item embeddings, for the ``point`` reward).
    """

    def __init__(self, dataset: RecDataset, retriever, text_emb: np.ndarray) -> None:
        import torch

        self.config: ResourceConfig | None = None  # set by get_resources: what rebuilds these in a new process
        self.dataset = dataset
        self.retriever = retriever
        self.encoder = retriever.encoder
        norms = np.linalg.norm(text_emb, axis=1, keepdims=True)
        self.text_emb = np.where(norms > 0, text_emb / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
        with torch.inference_mode():
            v = torch.nn.functional.normalize(retriever.trm.item_vectors().float(), dim=-1)
        self.item_vecs = v.cpu().numpy()


_RESOURCES: dict[ResourceConfig, Resources] = {}


def get_resources(config, *, progress: bool = True) -> Resources:
    """The shared :class:`Resources` of ``config``, built once per process.

    ``config`` is a :class:`ResourceConfig` or anything with a ``.resources`` one, such as
    :class:`~deeprec_env.env.EnvConfig`.
    """
    key = getattr(config, "resources", config)
    if not isinstance(key, ResourceConfig):
        raise TypeError(f"config must be a ResourceConfig or an EnvConfig, got {type(config).__name__}")
    if key not in _RESOURCES:
        from deeprec_env.embed import TextEncoder, item_text_embeddings
        from deeprec_env.retrieval import Retriever

        if key.dataset == "synthetic":
            ds = synthetic(config=key.preprocess if key.preprocess != PreprocessConfig() else None)
        else:
            ds = load_dataset(key.dataset, key.dataset_path, config=key.preprocess, metadata=key.metadata_path)
        encoder = TextEncoder(key.encoder, device=key.trm.device, backend=key.encoder_backend)
        retriever = Retriever.for_dataset(
            ds, key.trm, encoder, key.index, checkpoint=key.trm_checkpoint, progress=progress
        )
        res = Resources(ds, retriever, item_text_embeddings(ds.catalog, encoder))
        res.config = key
        _RESOURCES[key] = res
    return _RESOURCES[key]


def lookup_resources(config: ResourceConfig) -> Resources | None:
    """The resources :func:`get_resources` built for ``config`` in this process, or None."""
    return _RESOURCES.get(config)
