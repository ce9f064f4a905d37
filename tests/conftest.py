"""Shared offline fixtures: tiny synthetic data, a tiny encoder, TRM and LM (caches are isolated by ../conftest.py)."""

import pytest

from deeprec_env.data import synthetic


@pytest.fixture(scope="session")
def tiny_ds():
    return synthetic(n_users=60, n_items=40, seed=0)


def build_tiny_encoder(folder):
    """A randomly initialised 2-layer BERT with a word-level tokenizer, saved like any local model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words += sorted({w.lower() for t in synthetic(60, 40, seed=0).catalog.texts for w in t.replace(".", " ").split()})
    words += "comedy drama action horror romance thriller light dark funny sad old new movies".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_encoder_path):
    from deeprec_env.embed import TextEncoder

    return TextEncoder(tiny_encoder_path)


TINY_TRM = dict(d_model=16, n_heads=2, ffn_dim=32, max_len=12, max_epochs=3, batch_size=32, lr=5e-3, dropout=0.2)


@pytest.fixture(scope="session")
def env_kwargs(tiny_encoder_path):
    """Keyword arguments for a fast DeepRec env on synthetic data with a tiny encoder and TRM."""
    from deeprec_env.trm import TRMConfig

    return dict(dataset="synthetic", encoder=str(tiny_encoder_path), trm=TRMConfig(**TINY_TRM))


@pytest.fixture(scope="session")
def resources(env_kwargs, tmp_path_factory):
    import os

    from deeprec_env.env import EnvConfig, get_resources

    old = os.environ.get("DEEPREC_CACHE")
    os.environ["DEEPREC_CACHE"] = str(tmp_path_factory.mktemp("res_cache"))
    try:
        return get_resources(EnvConfig(**env_kwargs), progress=False)
    finally:
        if old is None:
            del os.environ["DEEPREC_CACHE"]
        else:
            os.environ["DEEPREC_CACHE"] = old


@pytest.fixture
def make_env(env_kwargs, resources):
    from deeprec_env.env import DeepRecEnv

    def make(**overrides):
        return DeepRecEnv(resources=resources, **{**env_kwargs, **overrides})

    return make


def build_tiny_lm(folder):
    """A randomly initialised 2-layer Llama with a byte-level BPE tokenizer trained on a few texts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = [
        "<pad>",
        "</s>",
        "<|begin_of_preference|>",
        "<|end_of_preference|>",
        "<recommendation_list>",
        "</recommendation_list>",
        "<think>",
        "</think>",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t for t in synthetic(60, 40, seed=0).catalog.texts] + ["The user likes drama; comedy. 1. 2. 3."] * 5
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast.save_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture
def fake_vllm(monkeypatch):
    """Install the vLLM stand-in (tests/fake_vllm.py) as ``vllm``; yields the module (its ``ENGINES``)."""
    import os
    import sys

    from tests import fake_vllm as module

    module.ENGINES.clear()
    monkeypatch.setitem(sys.modules, "vllm", module)
    had = "VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ
    yield module
    if not had:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
