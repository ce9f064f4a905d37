"""Tiny building blocks for tests, yours and ours: synthetic data, a random text encoder and LM, fast settings.

Everything is built in seconds on a CPU from random weights, offline, and saved like any local model, so
the real loading code paths run::

    import gymnasium as gym
    from deeprec_env.fixtures import build_tiny_encoder, build_tiny_lm, tiny_env_kwargs

    encoder = build_tiny_encoder(tmp_path / "encoder")
    env = gym.make("DeepRec-v0", **tiny_env_kwargs(encoder))
    lm_folder = build_tiny_lm(tmp_path / "lm")  # LLMPolicy(str(lm_folder)) loads it

The tiny models know nothing: they exercise code, not quality.
"""

from __future__ import annotations

from pathlib import Path

from deeprec_env.data import RecDataset, synthetic
from deeprec_env.protocol import ProtocolConfig

TINY_TRM = dict(d_model=16, n_heads=2, ffn_dim=32, max_len=12, max_epochs=3, batch_size=32, lr=5e-3, dropout=0.2)
"""TRM settings that train on :func:`tiny_dataset` in about a second."""

PROTOCOL_TOKENS = ProtocolConfig().tags
"""The protocol's tags, single tokens in the tiny LM's vocabulary."""

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
"""Extra special tokens of :func:`build_tiny_lm` with ``chatml=True`` (Qwen-style chat and tool calls)."""


def tiny_dataset(seed: int = 0) -> RecDataset:
    """The synthetic dataset the tiny fixtures are built for (60 users, 40 items)."""
    return synthetic(n_users=60, n_items=40, seed=seed)


def build_tiny_encoder(folder: str | Path) -> Path:
    """A randomly initialised 2-layer BERT (width 32) with a word-level tokenizer, saved to ``folder``.

    Its vocabulary holds the words of :func:`tiny_dataset`'s item texts and a few preference words.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = Path(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words += sorted({w.lower() for t in tiny_dataset().catalog.texts for w in t.replace(".", " ").split()})
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(cfg).save_pretrained(folder)
    return folder


def tiny_env_kwargs(encoder_folder: str | Path, **overrides) -> dict:
    """Keyword arguments of a fast DeepRec env on :func:`tiny_dataset` with the encoder in ``encoder_folder``."""
    from deeprec_env.trm import TRMConfig

    return {"dataset": "synthetic", "encoder": str(encoder_folder), "trm": TRMConfig(**TINY_TRM), **overrides}


SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _lm_corpus() -> list[str]:
    """Texts the tiny LM's tokenizer is trained on: the tiny catalogue and the protocol's texts.

    An episode of the tiny env is then about a thousand tokens, not thousands of bytes.
    """
    from deeprec_env.protocol import answer_text, call_text, chat_user_message, item_lines

    catalog = tiny_dataset().catalog
    p = ProtocolConfig()
    items = list(range(1, catalog.num_embeddings))
    corpus = list(catalog.texts) + ["The user likes drama; comedy. 1. 2. 3."] * 5
    for start in range(0, len(items), 5):
        shown = items[start : start + 5]
        corpus.append(chat_user_message(item_lines(catalog, shown), p, 10))
        corpus.append(call_text("drama; comedy", p, "The history leans one way."))
        corpus.append(answer_text([catalog.titles[i] for i in shown], p, "Ranking them."))
    return corpus


def build_tiny_lm(
    folder: str | Path, *, chatml: bool = False, chat_template: str | None = None, vocab_size: int = 1000
) -> Path:
    """A randomly initialised 2-layer Llama (width 32) with a byte-level BPE tokenizer, saved to ``folder``.

    Args:
        folder: where to save the model and tokenizer.
        chatml: add Qwen-style special tokens (:data:`CHATML_TOKENS`) and make ``<|im_end|>`` the end of
            sequence, for chat templates that call tools (set one with ``chat_template``).
        chat_template: the tokenizer's chat template (default: a minimal one without tools).
        vocab_size: size of the byte-level BPE vocabulary, trained on the tiny catalogue and the protocol's
            texts (an episode of the tiny env is then a few hundred tokens).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    eos = "<|im_end|>" if chatml else "</s>"
    specials = ["<pad>", "</s>", *PROTOCOL_TOKENS, *(CHATML_TOKENS if chatml else ())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _lm_corpus(),
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos)
    fast.chat_template = chat_template or SIMPLE_CHAT_TEMPLATE
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
