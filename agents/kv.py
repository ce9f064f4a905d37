"""Multi-turn generation that keeps each episode's KV cache across segments.

A lock-step batch of episodes shares one batched ``DynamicCache``. Between two segments only the new
tokens are run through the model: the rest of the last generated segment and the item list the
environment inserted. Rows grow by different amounts, so every appended chunk is right-aligned and
padded on its left; padding, and generated tokens cut after a stop string or EOS, stay in the cache as
holes that the attention mask hides, and position ids count only real tokens, so each token sees exactly
the context (and position) it has in the trajectory. The tokens and marks are those of
``model.generate`` on the whole context (``tests/test_kv.py`` compares them).
"""

from __future__ import annotations

import inspect

import torch

from agents.rollout import sampling_logits


def _common_prefix(rows: list[list[int]], longest: int) -> int:
    """Length of the prefix all ``rows`` share, at most ``longest``."""
    first = rows[0]
    n = 0
    while n < longest and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def _forward_parameters(model) -> dict:
    """Parameters of the causal LM's ``forward`` under its wrappers (DDP's ``module``, peft's base model)."""
    inner = getattr(model, "module", model)
    return inspect.signature(getattr(inner, "get_base_model", lambda: inner)().forward).parameters


def _cache_argument(params: dict) -> str:
    """The name ``forward`` takes a KV cache by: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in params else "past_key_values"


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Length of the prefix every row of a right-padded batch shares, leaving each row at least one token."""
    lengths = attention_mask.sum(1).tolist()
    if len(lengths) < 2:
        return 0
    return _common_prefix([row[:n] for row, n in zip(input_ids.tolist(), lengths, strict=True)], min(lengths) - 1)


def shared_prefix_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared: int,
                         head_kwargs: dict | None = None, tail_kwargs: dict | None = None):  # fmt: skip
    """Logits of a right-padded batch whose rows share their first ``shared`` tokens, the prefix run once.

    The prefix goes through the model as a batch of one; its KV cache is repeated for every row and the
    rest of each row runs on top of it (positions continuing from ``shared``). The values, and the gradients
    through them, are those of the whole batch in one pass (up to float rounding): the prefix's gradient is
    the sum of what every row sends back through the repeated cache. Returns ``(head, tail)``: ``(1, shared, V)``
    logits of the prefix and ``(B, L - shared, V)`` of the rest; ``head_kwargs`` / ``tail_kwargs`` go to the two
    forward calls (``logits_to_keep``: only the last columns' logits).
    """
    cache_arg = _cache_argument(_forward_parameters(model))
    head = model(input_ids=input_ids[:1, :shared], use_cache=True, **(head_kwargs or {}))
    cache = getattr(head, "cache", None)
    cache = cache if cache is not None else head.past_key_values
    cache.batch_repeat_interleave(input_ids.shape[0])
    positions = torch.arange(shared, input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    tail = model(input_ids=input_ids[:, shared:], attention_mask=attention_mask, position_ids=positions,
                 use_cache=True, **{cache_arg: cache}, **(tail_kwargs or {}))  # fmt: skip
    return head.logits, tail.logits


class KVBatch:
    """Episodes (rows) generating in lock step over one batched KV cache.

    Args:
        model: the causal LM.
        pad_id: token id written into holes (never attended to).
    """

    MIN_SHARED = 16
    """Shortest common prompt prefix worth a forward pass of its own (shorter ones run with the rows)."""

    def __init__(self, model, pad_id: int) -> None:
        from transformers import DynamicCache

        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        params = _forward_parameters(model)
        self._cache_arg = _cache_argument(params)
        # only the last column's logits are needed: a prompt's other rows would cost a vocabulary projection each
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.states: list = []
        self.fed: list[int] = []
        """Per row: how many of its trajectory's tokens are in the cache."""
        self._slots: list[list[int]] = []

    def attach(self, states: list) -> None:
        """Start the batch with these (new) episodes."""
        self.states = list(states)
        self.fed = [0] * len(states)
        self.mask = torch.zeros((len(states), 0), dtype=torch.long, device=self.device)
        for s in states:
            s["kv"] = self

    def select(self, states: list) -> None:
        """Keep only the rows of ``states`` (episodes that ended are dropped), in that order."""
        rows = [next(i for i, s in enumerate(self.states) if s is st) for st in states]
        if rows != list(range(len(self.states))):
            index = torch.as_tensor(rows, device=self.device)
            if self.cache.get_seq_length() > 0:
                self.cache.batch_select_indices(index)
            self.mask = self.mask[index]
            self.states = [self.states[i] for i in rows]
            self.fed = [self.fed[i] for i in rows]

    def _forward(self, ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` (B, W) through the model after the cached tokens; logits of the last column."""
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        # transformers >= 5.2x names the cache argument ``cache``; earlier versions ``past_key_values``
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self._cache_arg: self.cache}, **self._last_only)  # fmt: skip
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        return out.logits[:, -1].float()

    def feed(self, trajectories: list) -> torch.Tensor:
        """Append every row's tokens that are not in the cache yet; next-token logits ``(B, V)``.

        On an empty cache, the prefix every row shares (the instructions of the prompt) runs once, as a
        batch of one, and its cache is copied to every row: the batch's prompts cost one instruction block.
        """
        chunks = [t.ids[f:] for t, f in zip(trajectories, self.fed, strict=True)]
        if min(len(c) for c in chunks) == 0:
            raise RuntimeError("a row has no new tokens (an episode continued without an observation)")
        if self.mask.shape[1] == 0 and len(chunks) > 1:
            shared = _common_prefix(chunks, longest=min(len(c) for c in chunks) - 1)  # each row keeps >= 1 token
            if shared >= self.MIN_SHARED:
                self.mask = self.mask[:1]
                self._forward(torch.as_tensor([chunks[0][:shared]], device=self.device),
                              torch.ones((1, shared), dtype=torch.long, device=self.device))  # fmt: skip
                self.cache.batch_repeat_interleave(len(chunks))
                self.mask = self.mask.expand(len(chunks), -1).contiguous()
                chunks = [c[shared:] for c in chunks]
        width = max(len(c) for c in chunks)
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long, device=self.device)
        new_mask = torch.zeros((len(chunks), width), dtype=torch.long, device=self.device)
        for r, c in enumerate(chunks):  # right-aligned: the last column is every row's newest token
            ids[r, width - len(c) :] = torch.as_tensor(c, device=self.device)
            new_mask[r, width - len(c) :] = 1
        self.fed = [len(t.ids) for t in trajectories]
        return self._forward(ids, new_mask)

    def sample(
        self,
        logits: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        done_fn,
    ) -> list[tuple[list[int], list[float]]]:
        """Generate up to ``max_new_tokens`` per row, feeding each token back; ``(ids, logprobs)`` per row.

        Sampling draws from the global torch generator exactly as transformers' sampling loop does (one
        ``multinomial`` over the whole batch per step), so a caller that seeds it gets the same draws.
        ``done_fn(row, ids)`` says whether a row has finished (EOS or a stop string).
        """
        n = logits.shape[0]
        ids: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        done = [False] * n
        self._slots = [[] for _ in range(n)]
        for _ in range(max_new_tokens):
            if temperature > 0:
                scores = sampling_logits(logits, temperature, top_k, top_p)
                token = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
            else:
                scores = logits
                token = scores.argmax(-1)
            logp = scores.log_softmax(-1).gather(-1, token[:, None]).squeeze(1)
            active = [not d for d in done]
            for r in range(n):
                if active[r]:
                    ids[r].append(int(token[r]))
                    lps[r].append(float(logp[r]))
                    done[r] = done_fn(r, ids[r])
            if all(done):
                break  # the last tokens are fed with the next chunk, if the episode goes on
            column = torch.where(torch.as_tensor(active, device=self.device), token, self.pad_id)[:, None]
            col_mask = torch.as_tensor(active, dtype=torch.long, device=self.device)[:, None]
            for r in range(n):
                if active[r]:
                    self._slots[r].append(self.mask.shape[1])  # the column this token takes
            logits = self._forward(column, col_mask)
        return list(zip(ids, lps, strict=True))

    def keep(self, kept: list[int]) -> None:
        """After cutting each row's segment to ``kept[r]`` tokens: hide the cached tokens beyond the cut."""
        for r, k in enumerate(kept):
            slots = self._slots[r]
            for col in slots[k:]:
                self.mask[r, col] = 0
            self.fed[r] += min(k, len(slots))
