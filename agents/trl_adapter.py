"""Train on DeepRec with TRL's ``GRPOTrainer`` (and warm-start with ``SFTTrainer``): ``pip install 'deeprec-env[trl]'``.

Three pieces, each usable alone (``docs/training.md``, "Train with TRL")::

    from trl import GRPOConfig, GRPOTrainer
    from agents.trl_adapter import DeepRecRollout, prompt_dataset, reward_functions

    env_kwargs = {"stage": "rec", "split": "test", "user_group": "rl"}
    trainer = GRPOTrainer(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        args=GRPOConfig(num_generations=4, per_device_train_batch_size=8, temperature=1.0),
        train_dataset=prompt_dataset(**env_kwargs),  # one row per episode: prompt (chat messages) + user
        rollout_func=DeepRecRollout(env_kwargs),     # the multi-turn episode, item lists masked out
        reward_funcs=reward_functions(env_kwargs),   # one per reward component; they sum to the return
    )
    trainer.train()

- :func:`prompt_dataset`: a ``datasets.Dataset`` with the episode's opening ``prompt`` (chat messages, or
  text with ``prompt="base"``) and its ``user``; any split, user group and stage.
- :class:`DeepRecRollout`: TRL's ``rollout_func``. For each prompt it plays the whole episode with the
  trainer's model (our :class:`~agents.llm.LLMPolicy`, KV cache across turns, sampling with the
  trainer's temperature / top-p / top-k), and returns the prompt ids, the completion ids (every generated
  segment and every item list the environment inserted, in order), the sampling log-probs, and
  ``env_mask`` (1 for generated tokens, 0 for inserted ones: TRL trains on the former only). A finished
  episode ends with the tokenizer's end-of-sequence token (masked out), so TRL does not count it as
  truncated; an episode whose last segment hit the token limit does not, so
  ``mask_truncated_completions=True`` drops exactly those. The episode's reward components, return and
  metrics travel to the reward functions as ``deeprec_components``, ``deeprec_return``, ``deeprec_metrics``.
- :func:`reward_functions`: one function per reward component with a non-zero weight in the stage, each
  returning the component summed over the episode times its weight, so with TRL's default
  ``reward_weights`` (all 1) the total is the environment's return; TRL logs each under its name.
- :func:`demonstration_dataset`: the warm-start transcripts of a scripted agent (``agents.sft``) as a
  tokenised dataset for ``SFTTrainer`` (``input_ids`` and ``assistant_masks``: the agent's segments only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from agents.base import play_episodes
from agents.llm import LLMPolicy
from deeprec_env.env import DeepRecEnv, EnvConfig, get_resources
from deeprec_env.rewards import COMPONENTS


def _require_datasets():
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise ImportError("the TRL adapter needs `datasets`: pip install 'deeprec-env[trl]'") from err
    return datasets


def prompt_key(prompt: Any) -> str:
    """The text identifying an episode's prompt: the last user message of chat messages, or the text itself."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[-1], dict) and "content" in prompt[-1]:
        return str(prompt[-1]["content"])
    raise TypeError(f"a prompt is chat messages (a list of dicts with 'content') or a str, got {type(prompt).__name__}")


def episode_prompts(env: DeepRecEnv) -> tuple[list[tuple[int, Any]], int]:
    """``(user, prompt)`` for each of ``env``'s episodes whose prompt no earlier one has, and the count dropped.

    The prompt is chat messages (``prompt="chat"``) or text (``"base"``). Two users whose shown histories
    are the same have the same prompt; only the first is kept, so a prompt names its user.
    """
    rows, seen, dropped = [], set(), 0
    for j in env.examples:
        obs, info = env.reset(options={"example": int(j)})
        prompt = info.get("messages", obs)
        key = prompt_key(prompt)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        rows.append((int(info["user"]), prompt))
    return rows, dropped


def prompt_dataset(*, users: Sequence[int] | None = None, tools: bool = False, **env_kwargs):
    """A ``datasets.Dataset`` of episode prompts: columns ``prompt`` and ``user`` (and ``split``, ``stage``).

    Args:
        users: keep only these users (dataset user indices); default every episode of the environment.
        tools: the prompts of the tool-call variant (:class:`deeprec_env.tools.DeepRecTRLEnv`, for
            ``environment_factory``) instead of the tag protocol's (for :class:`DeepRecRollout`).
        **env_kwargs: the environment's settings (:class:`~deeprec_env.env.EnvConfig`): dataset, split,
            user_group, stage, prompt, ... Pass the same to :class:`DeepRecRollout`.
    """
    datasets = _require_datasets()
    env = DeepRecEnv(**({**env_kwargs, "prompt": "chat", "actions": "tools"} if tools else env_kwargs))
    rows, dropped = episode_prompts(env)
    if users is not None:
        wanted = {int(u) for u in users}
        rows = [r for r in rows if r[0] in wanted]
    if not rows:
        raise ValueError("no episodes: the environment's split/user group has none of the requested users")
    ds = datasets.Dataset.from_dict(
        {
            "prompt": [p for _, p in rows],
            "user": [u for u, _ in rows],
            "split": [env.config.split] * len(rows),
            "stage": [env.config.stage] * len(rows),
        }
    )
    ds.info.description = f"DeepRec episodes ({dropped} with a prompt identical to an earlier one's dropped)"
    return ds


class DeepRecRollout:
    """TRL ``GRPOTrainer``'s ``rollout_func``: plays each prompt's DeepRec episode with the trainer's model.

    Args:
        env_kwargs: the environment's settings (the same as :func:`prompt_dataset`'s).
        max_new_tokens: token limit per generated segment.
        kv_cache: reuse the KV cache across an episode's segments (:class:`~agents.llm.LLMPolicy`).
        sampling: override the sampling settings read from the trainer's args (``temperature``, ``top_p``,
            ``top_k``).
    """

    def __init__(
        self,
        env_kwargs: dict | None = None,
        *,
        max_new_tokens: int = 128,
        kv_cache: bool = True,
        sampling: dict | None = None,
    ) -> None:
        self.env_kwargs = dict(env_kwargs or {})
        self.config = EnvConfig(**self.env_kwargs)
        self.max_new_tokens = max_new_tokens
        self.kv_cache = kv_cache
        self.sampling = dict(sampling or {})
        self._envs: list[DeepRecEnv] = []
        self._users: dict[str, int] | None = None
        self.calls = 0

    def _env_pool(self, n: int) -> list[DeepRecEnv]:
        res = get_resources(self.config)
        while len(self._envs) < n:
            self._envs.append(DeepRecEnv(resources=res, **self.env_kwargs))
        return self._envs[:n]

    def user_of(self, prompt: Any) -> int:
        """The user whose episode opens with ``prompt`` (a clear error for a prompt of another environment)."""
        if self._users is None:
            rows, _ = episode_prompts(self._env_pool(1)[0])
            self._users = {prompt_key(p): u for u, p in rows}
        key = prompt_key(prompt)
        if key not in self._users:
            raise ValueError(
                "a prompt that no episode of this environment opens with: build the dataset with prompt_dataset() "
                f"and the same env_kwargs as the rollout ({self.env_kwargs}); prompt starts {key[:80]!r}"
            )
        return self._users[key]

    def _sampling(self, trainer) -> dict:
        args = getattr(trainer, "args", None)
        top_k = getattr(args, "top_k", 0)
        out = {
            "temperature": float(getattr(args, "temperature", 1.0)),
            "top_p": float(getattr(args, "top_p", 1.0)),
            "top_k": int(top_k or 0),
        }
        out.update(self.sampling)
        return out

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        """Play one episode per prompt; returns TRL's rollout fields plus the episodes' rewards and metrics."""
        users = [self.user_of(p) for p in prompts]
        model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
        tokenizer = getattr(trainer, "processing_class", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
        seed = int(getattr(getattr(trainer, "args", None), "seed", 0)) * 1_000_003 + self.calls
        self.calls += 1
        sampling = self._sampling(trainer)
        policy = LLMPolicy(
            model, tokenizer, max_new_tokens=self.max_new_tokens, seed=seed, kv_cache=self.kv_cache, **sampling
        )
        envs = self._env_pool(len(prompts))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                records, states = play_episodes(policy, envs, [{"user": u} for u in users])
        finally:
            model.train(was_training)
        eos = tokenizer.eos_token_id
        out: dict[str, list] = {k: [] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask")}
        out.update(deeprec_components=[], deeprec_return=[], deeprec_metrics=[], deeprec_user=[])
        stops = self.config.protocol.stop_strings
        for rec, state in zip(records, states, strict=True):
            traj = state["traj"]
            n = traj.n_prompt
            completion, logprobs, mask = traj.ids[n:], traj.logprobs[n:], traj.policy_mask[n:]
            last = traj.segments[-1] if traj.segments else ""
            if eos is not None and last.rstrip().endswith(stops):  # the episode ended, not the token budget
                completion, logprobs, mask = [*completion, eos], [*logprobs, 0.0], [*mask, 0]
            out["prompt_ids"].append(list(traj.ids[:n]))
            out["completion_ids"].append(list(completion))
            out["logprobs"].append([float(x) for x in logprobs])
            out["env_mask"].append([int(x) for x in mask])
            out["deeprec_components"].append(dict(rec.episode_reward_components))
            out["deeprec_return"].append(float(rec.reward))
            out["deeprec_metrics"].append(dict(rec.metrics))
            out["deeprec_user"].append(int(rec.user))
        return out


def reward_functions(env_kwargs: dict | None = None) -> list[Callable]:
    """One TRL reward function per component weighted non-zero in the stage (``deeprec_<component>``).

    Each returns, per completion, the component summed over the episode times its weight, read from the
    ``deeprec_components`` field :class:`DeepRecRollout` returns; with TRL's default ``reward_weights``
    the functions sum to the environment's return.
    """
    weights = EnvConfig(**(env_kwargs or {})).weights

    def make(component: str, weight: float) -> Callable:
        def reward(prompts=None, completions=None, deeprec_components=None, **_) -> list[float]:
            if deeprec_components is None:
                raise ValueError("no 'deeprec_components': use DeepRecRollout as the trainer's rollout_func")
            return [weight * float(c.get(component, 0.0)) for c in deeprec_components]

        reward.__name__ = reward.__qualname__ = f"deeprec_{component}"
        return reward

    return [make(c, float(weights[c])) for c in COMPONENTS if weights.get(c, 0.0) != 0.0]


def demonstration_dataset(
    tokenizer,
    env_kwargs: dict | None = None,
    *,
    users: Sequence[int] | None = None,
    teacher: str = "history-facet",
    seed: int = 0,
):
    """Warm-start transcripts of a scripted agent as a tokenised dataset for TRL's ``SFTTrainer``.

    Columns: ``input_ids`` (the episode as :class:`~agents.llm.LLMPolicy` would see it, through
    ``tokenizer``'s chat template), ``assistant_masks`` (1 on the agent's segments: ``SFTTrainer`` trains
    on those only), ``user``. Episodes that fail the format check are dropped (``agents.sft``).
    """
    datasets = _require_datasets()
    from agents.sft import SFTArgs, demonstrations, make_teacher

    env_kwargs = dict(env_kwargs or {})
    if users is None:
        env = DeepRecEnv(**env_kwargs)
        users = [int(env.split.users[j]) for j in env.examples]
    trajs, recs = demonstrations(make_teacher(SFTArgs(teacher=teacher, seed=seed)), tokenizer, env_kwargs, list(users))
    if not trajs:
        raise ValueError("the teacher produced no well-formed episode")
    return datasets.Dataset.from_dict(
        {
            "input_ids": [list(t.ids) for t in trajs],
            "assistant_masks": [list(t.policy_mask) for t in trajs],
            "user": [int(r.user) for r in recs],
        }
    )
