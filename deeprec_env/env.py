"""DeepRec-v0: the text environment, its configuration and the resources it shares.

The environment card (spaces, rewards, episode ends, arguments, ``info`` keys, version history) is the
docstring of :class:`DeepRecEnv`: ``help(gym.make("DeepRec-v0").unwrapped)``.
"""

from __future__ import annotations

import pickle
import string
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from deeprec_env.data import RecDataset, Split
from deeprec_env.metrics import MISS, rank_metrics
from deeprec_env.protocol import (
    Action,
    Episode,
    ProtocolConfig,
    base_prompt,
    chat_user_message,
    check_format,
    format_patterns,
    hint_text,
    item_lines,
    item_list_text,
    parse,
    strip_title_line,
)
from deeprec_env.resources import ResourceConfig, Resources, get_resources, lookup_resources
from deeprec_env.rewards import (
    COMPONENTS,
    diversity_reward,
    format_reward,
    hit_index,
    hit_reward,
    invocation_reward,
    point_reward,
    rank_reward,
    retrieval_hit_reward,
    stage_weights,
    wasted_reward,
    weighted_reward,
)
from deeprec_env.spaces import SharedText
from deeprec_env.threads import limit_threads
from deeprec_env.tools import TOOLS, tool_segment, tool_user_message


@dataclass(frozen=True)
class EnvConfig(ResourceConfig):
    """Every option of :class:`DeepRecEnv`; defaults are the reference's on the embedded ml-100k.

    The fields of :class:`~deeprec_env.resources.ResourceConfig` (dataset, dataset_path, metadata_path,
    preprocess, trm, trm_checkpoint, encoder, encoder_backend, index) decide the shared resources; the
    rest decide the episodes.
    """

    split: Literal["train", "valid", "test"] = "test"
    """Which leave-one-out split the episodes come from."""
    user_group: Literal["all", "rl", "eval"] = "all"
    """Whose examples: every user's, the RL group's (a seeded share ``rl_share`` of the users, reserved for
    training a policy) or the evaluation group's (the others). A policy trained on ``rl`` and evaluated on
    ``eval`` never meets a training user, while both groups see the same kind of target (the bundled
    trainers and the evaluation harness do this; ``docs/evaluation.md``)."""
    rl_share: float = 0.5
    """Share of the users in the RL group."""
    group_seed: int = 0
    """Seed of the permutation that assigns users to the RL and evaluation groups."""
    users: int | None = None
    """Use only this many examples of the split (the first of a permutation seeded by ``users_seed``)."""
    users_seed: int = 0
    """Seed of the permutation that picks ``users``."""
    stage: Literal["rec", "coldstart"] = "rec"
    """Reward stage: ``rec`` (format, hit, rank, point) or ``coldstart`` (format, invocation, diversity)."""
    reward_weights: dict[str, float] | None = None
    """Explicit weights per component (overrides ``stage``); missing components weigh 0."""
    prompt: Literal["base", "chat"] = "base"
    """``base``: the reference's base-model prompt ending in ``<think>``; ``chat``: a user message for a
    chat template (also in ``info["messages"]``; the policy appends ``<think>\\n`` after the template)."""
    actions: Literal["text", "tools"] = "text"
    """``text``: a segment is text in the tag protocol; ``tools``: a ``recommend`` / ``answer`` tool call
    (a dict or its JSON text, written as the equivalent segment: ``deeprec_env.tools``), with a prompt
    that describes the two tools; needs ``prompt="chat"`` (``DeepRecTools-v0`` sets both)."""
    prompt_history: int = 20
    """Most recent history items shown in the prompt."""
    retrieval_k: int = 20
    """Items returned per call."""
    max_calls: int = 8
    """Call budget; the segment after the last allowed call must answer."""
    answer_k: int = 10
    """Lines the answer must have (K)."""
    dedup_retrieved: bool = False
    """Never return an item already retrieved in this episode (the reference does not de-duplicate)."""
    mask_history: bool = False
    """Never retrieve the user's history items (the reference does not mask them)."""
    allow_empty_preference: bool = False
    """Accept an empty preference as a TRM call without a preference (the reference treats it as an
    invalid action). The evaluation harness turns it on so that the TRM-only agent can call the TRM."""
    invalid_action: Literal["end", "feedback"] = "end"
    """``end``: an invalid segment ends the episode (reference). ``feedback``: it is rejected with a
    corrective message and ``format = -1`` for that step, and the episode goes on."""
    max_invalid: int = 3
    """In feedback mode, the episode ends (penalised) after this many rejected segments."""
    match: Literal["grounded", "substring"] = "grounded"
    """How answer lines name the target: grounded to catalogue ids (ours) or the reference's
    "target title is a substring of the line"."""
    fuzzy_cutoff: float = 0.9
    """Minimum difflib ratio for fuzzy title grounding (> 1 disables fuzzy matching)."""
    point_repeats: bool = False
    """Score an answer line that repeats an earlier line's item again in the ``point`` reward (the
    reference does, so one close item written ten times outscores a real list; by default a repeat scores 0,
    ``docs/design.md``, "Rewards")."""
    target_hint: bool = False
    """Privileged, for checking a trainer, never for a benchmark: the prompt names the categories of the item the
    user chooses next, in a line before the history (``deeprec_env.protocol.hint_text``). A policy that learns to
    write them as its preference retrieves far better (the ``oracle-preference`` agent), so a trainer that cannot
    teach a policy to use the hint cannot teach it a better call either: a positive control
    (``docs/training.md``)."""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """Tags and format rules."""
    max_obs_chars: int | None = None
    """Length bound of the observation space; None (default): the longest observation these settings can
    produce (the prompt with ``prompt_history`` of the catalogue's longest item lines, an item list of
    ``retrieval_k`` of them, a feedback message). Gymnasium's shared memory (``AsyncVectorEnv``) allocates
    this many characters per sub-environment. A value below that bound is an error."""
    threads: int | None = 1
    """torch threads for the environment's own compute (encoding a preference, the TRM forward), set
    around each retrieval and restored after it; None leaves the process's setting. One thread is fastest
    on a busy machine (``docs/design.md``, "Vector environments, processes and threads"); faiss uses
    ``index.threads``."""

    def __post_init__(self) -> None:
        super().__post_init__()  # types of every field, paths that must exist
        for name in ("prompt_history", "retrieval_k", "max_calls", "answer_k", "max_invalid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users={self.users}; must be >= 1 or None")
        if self.actions == "tools" and self.prompt != "chat":
            raise ValueError("actions='tools' is a chat protocol: it needs prompt='chat'")
        for name in ("threads", "max_obs_chars"):  # types: checked above, from the annotations
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}; must be >= 1 or None")
        # the Literal fields (split, user_group, stage, prompt, ...) are checked from their annotations
        if self.encoder_backend not in ("torch", "onnx"):
            raise ValueError(f"encoder_backend={self.encoder_backend!r}; must be one of ('torch', 'onnx')")
        if self.fuzzy_cutoff < 0:
            raise ValueError(f"fuzzy_cutoff={self.fuzzy_cutoff}; must be >= 0 (> 1 disables fuzzy matching)")
        if not 0 < self.rl_share < 1:
            raise ValueError(f"rl_share={self.rl_share}; must be in (0, 1)")
        stage_weights(self.stage, self.reward_weights)  # validates both

    @property
    def weights(self) -> dict[str, float]:
        """Weight of every reward component."""
        return stage_weights(self.stage, self.reward_weights)

    @property
    def resources(self) -> ResourceConfig:
        """The settings that decide the shared resources (dataset, encoder, TRM, index)."""
        return ResourceConfig(**{f.name: getattr(self, f.name) for f in fields(ResourceConfig)})


def episode_split(config: EnvConfig, dataset: RecDataset) -> Split:
    """The examples the episodes of ``config`` come from: its split, restricted to its user group."""
    split = dataset.split(config.split)
    if config.user_group == "all":
        return split
    return split.for_users(dataset.user_group(config.user_group, config.rl_share, config.group_seed))


def _int_option(options: dict, key: str) -> int:
    """``options[key]`` as an int: a Python or numpy integer (or a 0-d integer array), nothing coerced."""
    value = options[key]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"options[{key!r}]={value!r} ({type(value).__name__}); must be an int")
    return int(value)


class RenderModeError(ValueError, TypeError):
    """An unsupported ``render_mode``.

    A TypeError too: stable-baselines3's ``make_vec_env`` asks every environment for
    ``render_mode="rgb_array"`` and retries without it on a TypeError.
    """


def check_render_mode(render_mode: str | None, modes: list[str]) -> None:
    """Raise :class:`RenderModeError` unless ``render_mode`` is None or one of ``modes``."""
    if render_mode is not None and render_mode not in modes:
        raise RenderModeError(
            f"render_mode={render_mode!r}; DeepRec renders its transcript as text only: pass None or "
            f"{' or '.join(repr(m) for m in modes)}"
        )


def observation_bound(catalog, config: EnvConfig) -> int:
    """The longest observation ``config`` can produce on ``catalog``, in characters.

    The prompt with ``prompt_history`` of the catalogue's longest item lines, an item list with
    ``retrieval_k`` of them, or a feedback message (error texts are short and never quote the action).
    """
    p = config.protocol
    numbers = len(str(max(config.prompt_history, config.retrieval_k))) + 2  # "NN. "
    # the longest "Title\n  - categories: a, b" line without its number (item_lines' format)
    longest = max(
        (len(t) + (len("\n  - categories: ") + len(", ".join(c)) if c else 0)
         for t, c in zip(catalog.titles[1:], catalog.categories[1:], strict=True)),
        default=0,
    )  # fmt: skip
    line = numbers + longest + 1  # + the newline between lines
    hint = ""
    if config.target_hint:  # the item with the longest category list names the longest hint
        hint = max((hint_text(c) for c in catalog.categories[1:]), key=len, default=hint_text(()))
    prompt = max(len(f(hint)) for f in (lambda h: base_prompt("", p, config.answer_k, h),
                                        lambda h: chat_user_message("", p, config.answer_k, h),
                                        lambda h: tool_user_message("", config.answer_k, h)))  # fmt: skip
    prompt += config.prompt_history * line
    items = len(item_list_text(catalog, [], p)) + config.retrieval_k * line
    feedback = 1024 + 16 * max(len(t) for t in p.tags)
    return max(prompt, items, feedback)


@dataclass
class RetrievalRequest:
    """A call waiting for its item list (lets a vector env batch the retrieval of many envs)."""

    history: np.ndarray
    preference: str
    exclude: np.ndarray | None


class DeepRecEnv(gym.Env[str, str]):
    r"""DeepRec-v0: an LLM explores the item space through a preference-aware recommender, then ranks 10 items.

    ## Description

    One episode is one user with one held-out target item (``docs/design.md``). The prompt shows the
    user's history as numbered titles with their categories. Each ``step`` consumes one text segment of
    the policy. A segment that ends in a TRM call ``<|begin_of_preference|> phrases <|end_of_preference|>``
    gets the top-20 items that the TRM retrieves for (history, preference) back as the next observation;
    a segment that holds ``</think>`` and ``<recommendation_list> 1. ... 10. </recommendation_list>`` ends
    the episode with the outcome reward.

    ## Action Space

    ``gymnasium.spaces.Text``: one generated segment. ``step`` accepts any ``str`` (a non-``str`` raises
    ``TypeError``); ``action_space.contains`` is True only for segments over the observation charset of
    at most ``protocol.max_segment_chars`` characters: other characters are parsed as they are (they cannot
    form a tag), and longer segments are invalid actions.

    With ``actions="tools"`` (``DeepRecTools-v0``) an action is a tool call instead: a dict
    ``{"name": "recommend", "arguments": {"preference": "..."}}`` or ``{"name": "answer", "arguments":
    {"items": ["title", ...]}}`` (optional ``"content"``: the reasoning before it) or its JSON text; it is
    written as the equivalent segment (``deeprec_env.tools``), a malformed call is an invalid action with
    ``info["tool_error"]``, and any other type raises ``TypeError``. The prompt then describes the two
    tools and ``info["tools"]`` holds their schema for the chat template.

    ## Observation Space

    ``gymnasium.spaces.Text`` (``deeprec_env.spaces.SharedText``, which also crosses ``AsyncVectorEnv``'s
    shared memory) whose charset covers printable ASCII, the protocol and every character of the
    catalogue, and whose ``max_length`` is the longest observation the settings can produce. ``reset``
    returns the prompt; a call returns the inserted item list
    (``<|begin_of_item_list|>\n1. Title\n  - categories: a, b\n...<|end_of_item_list|>\n\n``); with
    ``invalid_action="feedback"`` an invalid segment returns a corrective message; the last step returns "".

    ## Rewards

    Every component is returned unweighted in ``info["reward_components"]``; the step reward is
    ``sum(weights[c] * components[c])``. Stage ``rec`` weighs format + hit + rank + point, stage
    ``coldstart`` format + invocation + diversity (``deeprec_env.rewards.STAGES``).

    | component | stage | range | when |
    |---|---|---|---|
    | format | both | {0, -1} | episode end: -1 if a whole-response check fails; feedback mode: each rejection |
    | invocation | coldstart | {0, 0.5, 1} | episode end; n = min(calls, 3), 0.5 * (n - 1) if n > 1 |
    | diversity | coldstart | [0, 0.4] | episode end; 0.2 * (1 - mean pairwise cosine of the preferences) |
    | retrieval_hit | off | [0, 1] | the call whose list first holds the target, at rank r: 1 / log2(r + 2) |
    | hit | rec | {0, 1} | episode end, format = 0, an answer line names the target |
    | rank | rec | [0, 2] | episode end, format = 0, 0.2 * (10 - i) for the first line i naming the target |
    | point | rec | [-10, 10] | episode end, format = 0, 10 * weighted mean similarity of answer and target |
    | wasted | off | [-1, 0] | episode end, format = 0, - share of lines naming no item, a repeat or a seen item |

    ## Starting State

    A user of the chosen split and user group (``user_group``: all users, the RL group that policies train
    on, or the evaluation group; ``docs/evaluation.md``): drawn with ``self.np_random``, or
    ``options={"user": u}`` (a dataset user index) or ``options={"example": j}`` (an index into the group's
    examples). The same options give the same episode, so a trainer can sample a group of responses for one
    user.

    ## Episode End

    Every end is a *termination*: each is part of the task, and all but the first are penalised (format -1),
    so a trainer must not bootstrap past them. The environment never truncates; a step limit of your own
    belongs in a wrapper such as ``gymnasium.wrappers.TimeLimit``.

    - *Termination*: a valid answer segment.
    - *Termination*: an invalid segment when ``invalid_action="end"`` (the reference behaviour).
    - *Termination*: a call when the budget (``max_calls``, 8) is spent: the 9th segment must answer.
    - *Termination*: more than ``max_invalid`` rejected segments when ``invalid_action="feedback"``.

    ## Arguments

    ``gym.make("DeepRec-v0", **kwargs)`` takes any field of :class:`EnvConfig` (each documented there) and
    ``render_mode="ansi"``. The main ones:

    | argument | default | meaning |
    |---|---|---|
    | ``dataset`` / ``dataset_path`` | ``"ml-100k"`` / None | ml-100k (embedded), ml-1m, amazon, atomic or synthetic |
    | ``split`` / ``user_group`` | ``"test"`` / ``"all"`` | leave-one-out split; all users, the RL or evaluation group |
    | ``stage`` / ``reward_weights`` | ``"rec"`` / None | reward stage (``rec``, ``coldstart``) or explicit weights |
    | ``prompt`` / ``prompt_history`` | ``"base"`` / 20 | base-model or chat prompt; history items shown |
    | ``retrieval_k`` / ``max_calls`` / ``answer_k`` | 20 / 8 / 10 | items per call, call budget, answer lines |
    | ``dedup_retrieved`` / ``mask_history`` | False / False | never return retrieved / history items |
    | ``target_hint`` | False | privileged: the prompt names the target's categories (a trainer's positive control) |
    | ``allow_empty_preference`` | False | accept an empty preference as a call without one |
    | ``invalid_action`` / ``max_invalid`` | ``"end"`` / 3 | end on an invalid segment, or reject it with feedback |
    | ``match`` / ``fuzzy_cutoff`` | ``"grounded"`` / 0.9 | ground answer lines to ids, or the reference's rule |
    | ``protocol`` | ``ProtocolConfig()`` | tags and format rules |
    | ``trm`` / ``trm_checkpoint`` | ``TRMConfig()`` / None | TRM settings (trained once and cached) or a checkpoint |
    | ``encoder`` / ``encoder_backend`` | ``"minilm"`` / ``"torch"`` | text encoder (hub id or path), how it runs |
    | ``index`` | ``IndexConfig()`` | faiss index (exact, HNSW, IVF; ``threads``, default 1) |
    | ``threads`` | 1 | torch threads of the env's own compute (None: the process's setting) |
    | ``max_obs_chars`` | None | observation-space bound (None: the longest possible observation) |

    ``DeepRecColdStart-v0`` is the same environment with ``stage="coldstart"``. Every vectorisation mode
    works (``gym.make_vec``: ``vector_entry_point`` batches retrieval; ``sync``; ``async`` in ``fork`` or
    ``spawn`` context), environments pickle cheaply, and forked workers never hang
    (``docs/design.md``, "Vector environments, processes and threads").

    ## Info

    reset: ``user``, ``user_id``, ``history`` (list of the ids shown), ``split``, ``stage``, ``messages``
    (chat prompt). step: ``is_action_valid``, ``action_kind``, ``errors``, ``reward_components`` (this
    step's), ``episode_reward_components`` (their sums over the episode so far: at the end, the weighted
    sum is the return), ``n_calls``; after a call also ``retrieved`` (list of ids), ``preference`` and ``env_text`` (the
    inserted text). At the end also ``target``, ``answer_ids``, ``rank``, ``metrics`` (recall@1/5/10,
    ndcg@5/10; a failed or malformed episode is a miss), ``hallucinated``, ``seen``, ``duplicates`` and
    ``format_errors``. ``rank`` is the target's answer line (0-based; every line keeps its place, whether it
    names an item or not), the position the ``rank`` reward and the metrics use.

    ## Version History

    - v0 (deeprec-env 0.3): ``info["episode_reward_components"]``; the observation bound is computed
      (was 1,000,000 characters) so ``AsyncVectorEnv`` works; torch runs single-threaded inside the env
      (``threads``); environments pickle; ``actions="tools"`` (``DeepRecTools-v0``). Episodes and rewards
      of the text protocol are unchanged.
    - v0 (deeprec-env 0.2): the TRM treats a preference as evidence (``docs/trm.md``), so the same actions
      retrieve different items than in 0.1; ``info["rank"]`` and the metrics count every answer line; a spent
      call budget and too many rejected segments end the episode as terminations (they were truncations).
    - v0 (deeprec-env 0.1): first release.

    ## Example

    On the synthetic dataset with a tiny TRM (the defaults use ml-100k and train the TRM once, ~3 minutes):

    >>> import gymnasium as gym, deeprec_env
    >>> from deeprec_env.trm import TRMConfig
    >>> tiny = TRMConfig(d_model=16, n_heads=2, ffn_dim=32, max_len=12, max_epochs=1)
    >>> env = gym.make("DeepRec-v0", dataset="synthetic", trm=tiny)
    >>> obs, info = env.reset(seed=0)
    >>> obs.endswith("<think>\n"), info["split"]
    (True, 'test')
    >>> obs, reward, terminated, truncated, info = env.step("<|begin_of_preference|> drama <|end_of_preference|>")
    >>> obs.startswith("<|begin_of_item_list|>"), len(info["retrieved"]), reward, terminated
    (True, 20, 0.0, False)
    >>> titles = [env.unwrapped.catalog.titles[i] for i in info["retrieved"][:10]]
    >>> answer = "\n".join(f"{n}. {t}" for n, t in enumerate(titles, start=1))
    >>> obs, reward, terminated, truncated, info = env.step(
    ...     f"Done.\n</think>\n<recommendation_list>\n{answer}\n</recommendation_list>")
    >>> terminated, info["format_errors"], len(info["answer_ids"])
    (True, [], 10)

    Args:
        render_mode: None or ``"ansi"``.
        resources: shared dataset/TRM/index to use instead of :func:`get_resources` (which already
            caches them per process). Pass it when constructing envs directly; through ``gym.make`` it
            makes the spec impossible to copy (``check_env`` copies it).
        **kwargs: fields of :class:`EnvConfig`.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, render_mode: str | None = None, resources: Resources | None = None, **kwargs: Any) -> None:
        check_render_mode(render_mode, self.metadata["render_modes"])
        self.render_mode = render_mode
        self.config = EnvConfig(**kwargs)
        self.res = resources if resources is not None else get_resources(self.config)
        self.weights = self.config.weights
        self.catalog = self.res.dataset.catalog
        self.split = episode_split(self.config, self.res.dataset)
        examples = np.arange(len(self.split))
        if self.config.users is not None:
            examples = np.random.default_rng(self.config.users_seed).permutation(examples)[: self.config.users]
        self.examples = examples
        self._position = {int(e): i for i, e in enumerate(examples)}
        p = self.config.protocol
        chars = set(string.printable) | set(self.catalog.charset) | set("".join(p.tags)) | set("—•’“”")
        charset = "".join(sorted(chars))
        bound = observation_bound(self.catalog, self.config)
        if self.config.max_obs_chars is not None and self.config.max_obs_chars < bound:
            raise ValueError(
                f"max_obs_chars={self.config.max_obs_chars} is below the longest observation these settings can "
                f"produce ({bound} characters); pass max_obs_chars=None (the default) or >= {bound}"
            )
        max_obs = bound if self.config.max_obs_chars is None else self.config.max_obs_chars
        self.observation_space = SharedText(max_length=max_obs, min_length=0, charset=charset)
        self.action_space = spaces.Text(max_length=p.max_segment_chars, min_length=0, charset=charset)
        self.episode: Episode | None = None
        self._patterns = format_patterns(p)
        self._done = True
        self._example = -1
        self._totals = dict.fromkeys(COMPONENTS, 0.0)

    # ------------------------------------------------------------------------------------------
    # pickling: the shared resources are re-resolved from their config, never serialised

    def __getstate__(self) -> dict:
        config = getattr(self.res, "config", None)
        if config is None or lookup_resources(config) is not self.res:
            raise pickle.PicklingError(
                "this environment was built on resources passed in by hand; only environments on "
                "get_resources(config) resources pickle (they are rebuilt from the config on unpickling)"
            )
        state = self.__dict__.copy()
        for name in ("res", "catalog", "split"):
            del state[name]
        state["_resource_config"] = config
        return state

    def __setstate__(self, state: dict) -> None:
        config = state.pop("_resource_config")
        self.__dict__.update(state)
        self.res = get_resources(config)
        self.catalog = self.res.dataset.catalog
        self.split = episode_split(self.config, self.res.dataset)

    # ------------------------------------------------------------------------------------------
    # reset

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """Start an episode; ``options={"user": u}`` or ``{"example": j}`` picks it."""
        super().reset(seed=seed)
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
        unknown = set(options) - {"user", "example"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; use 'user' or 'example'")
        if "user" in options and "example" in options:
            raise ValueError("pass options 'user' or 'example', not both")
        if "user" in options:
            j = self.split.example(_int_option(options, "user"))
        elif "example" in options:
            j = _int_option(options, "example")
            if not 0 <= j < len(self.split):
                raise ValueError(f"example={j}; must be in 0..{len(self.split) - 1}")
        else:
            j = int(self.examples[self.np_random.integers(len(self.examples))])
        self._example = j
        cfg = self.config
        shown = self.split.history(j, cfg.prompt_history)
        history_text = item_lines(self.catalog, shown)
        target = int(self.split.targets[j])
        hint = hint_text(self.catalog.categories[target]) if cfg.target_hint else ""
        if cfg.actions == "tools":
            prompt = tool_user_message(history_text, cfg.answer_k, hint)
        elif cfg.prompt == "base":
            prompt = base_prompt(history_text, cfg.protocol, cfg.answer_k, hint)
        else:
            prompt = chat_user_message(history_text, cfg.protocol, cfg.answer_k, hint)
        user = int(self.split.users[j])
        self.episode = Episode(user=user, target=target, history=shown, prompt=prompt, patterns=self._patterns)
        self._full_history = self.split.history(j, 10**9)
        self._trm_history = self.split.history(j, self.res.retriever.max_len)
        self._prefetch_states(j)
        self._rejected = 0
        self._tool_error = None
        self._done = False
        self._totals = dict.fromkeys(COMPONENTS, 0.0)
        info = {
            "user": user,
            "user_id": str(self.res.dataset.user_ids[user]),
            "history": shown.tolist(),
            "split": cfg.split,
            "stage": cfg.stage,
        }
        if cfg.prompt == "chat":
            info["messages"] = [{"role": "user", "content": prompt}]
        if cfg.actions == "tools":
            info["tools"] = TOOLS
        return prompt, info

    PREFETCH = 256
    """Episodes whose TRM history states are encoded together when one of them is first needed."""

    def _prefetch_states(self, j: int) -> None:
        """Encode the TRM states of the block of episodes around ``j`` in one batch, if ``j``'s is not cached.

        Blocks are fixed runs of :attr:`PREFETCH` consecutive episodes of :attr:`examples`, so the same
        calls encode the same batches in any run. A state encoded in a batch can differ from one encoded
        alone by float rounding (1e-7); on ml-100k the two are bit-identical. Retrievers without a
        ``prefetch`` method (a remote TRM) are left alone.
        """
        retriever = self.res.retriever
        if not hasattr(retriever, "prefetch") or retriever.cached(self._trm_history):
            return
        pos = self._position.get(j)
        block = [j] if pos is None else self.examples[pos - pos % self.PREFETCH :][: self.PREFETCH]
        with limit_threads(self.config.threads):
            retriever.prefetch([self.split.history(int(i), retriever.max_len) for i in block], self.PREFETCH)

    # ------------------------------------------------------------------------------------------
    # step, in two halves so that a vector env can batch the retrieval in between

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """Consume one policy segment; see the module docstring."""
        pending = self.begin_step(action)
        if isinstance(pending, RetrievalRequest):
            excl = None if pending.exclude is None else [pending.exclude]
            with limit_threads(self.config.threads):
                ids, _ = self.res.retriever.retrieve(
                    [pending.history], [pending.preference], self.config.retrieval_k, exclude=excl
                )
            return self.end_step(ids[0])
        return pending

    def begin_step(self, action: str):
        """Parse ``action``; return a :class:`RetrievalRequest` for a call, else the step's result tuple."""
        if self._done or self.episode is None:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        self._tool_error = None
        if self.config.actions == "tools":
            if not isinstance(action, str | dict):
                raise TypeError(f"action must be a tool call (a dict or its JSON text), got {type(action).__name__}")
            action, self._tool_error = tool_segment(action, self.config.protocol)
        if not isinstance(action, str):
            raise TypeError(f"action must be str, got {type(action).__name__}")
        ep, cfg = self.episode, self.config
        act = parse(action, cfg.protocol, allow_empty=cfg.allow_empty_preference)
        if act.kind == "call":
            if ep.n_calls >= cfg.max_calls:
                ep.add("policy", action)
                ep.end_reason = f"call budget of {cfg.max_calls} spent: this segment had to answer"
                return self._finish(act)
            ep.add("policy", action)
            ep.preferences.append(act.preference)
            self._pending = act
            excl = []
            if cfg.dedup_retrieved and ep.retrieved:
                excl.append(np.concatenate(ep.retrieved))
            if cfg.mask_history:
                excl.append(self._full_history)
            exclude = np.unique(np.concatenate(excl)) if excl else None
            return RetrievalRequest(self.trm_history, act.preference, exclude)
        if act.kind == "answer":
            ep.add("policy", action)
            ep.answer = act
            return self._finish(act)
        # invalid
        if cfg.invalid_action == "feedback":
            self._rejected += 1
            if self._rejected > cfg.max_invalid:
                ep.end_reason = f"more than {cfg.max_invalid} rejected segments"
                return self._finish(act)
            comps = dict.fromkeys(COMPONENTS, 0.0)
            comps["format"] = -1.0
            msg = f"[invalid action: {'; '.join(act.errors)}. Continue with a call or the final answer.]\n"
            return msg, self._weighted(comps), False, False, self._step_info(act, comps)
        ep.add("policy", action[: cfg.protocol.max_segment_chars])
        ep.invalid.append(act.errors)
        return self._finish(act)

    def end_step(self, ids: np.ndarray) -> tuple[str, float, bool, bool, dict]:
        """Finish a call with the retrieved ``ids``: insert the item list, give ``retrieval_hit``."""
        ep = self.episode
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids > 0]
        ep.retrieved.append(ids)
        text = item_list_text(self.catalog, ids, self.config.protocol)
        ep.add("env", text)
        comps = dict.fromkeys(COMPONENTS, 0.0)
        comps["retrieval_hit"] = retrieval_hit_reward(ep, len(ep.retrieved) - 1)
        info = self._step_info(self._pending, comps)
        info.update(retrieved=ids.tolist(), preference=ep.preferences[-1], env_text=text)
        return text, self._weighted(comps), False, False, info

    # ------------------------------------------------------------------------------------------

    def _weighted(self, comps: dict[str, float]) -> float:
        return weighted_reward(self.weights, comps)

    def _step_info(self, act: Action, comps: dict[str, float]) -> dict:
        """The step's info; called once per step, it also adds ``comps`` to the episode's totals."""
        for c, v in comps.items():
            self._totals[c] += v
        info = {
            "is_action_valid": act.kind != "invalid",
            "action_kind": act.kind,
            "errors": list(act.errors),
            "reward_components": comps,
            "episode_reward_components": dict(self._totals),
            "n_calls": self.episode.n_calls,
        }
        if self._tool_error is not None:
            info["tool_error"] = self._tool_error
        return info

    def _ground(self, lines: tuple[str, ...]) -> list[int | None]:
        target = self.episode.target
        out: list[int | None] = []
        for line in lines:
            title = strip_title_line(line)
            if self.config.match == "substring":
                # the reference: the line names the target when the target title is a substring of it
                if self.catalog.titles[target] in line:
                    out.append(target)
                    continue
            item = self.catalog.ground(title, fuzzy_cutoff=self.config.fuzzy_cutoff) if title else None
            if item is not None and item != target and self.catalog.titles[item] == self.catalog.titles[target]:
                item = target  # the same title under two ids (9 in ml-100k after filtering) names the target
            out.append(item)
        return out

    def _finish(self, act: Action):
        ep, cfg = self.episode, self.config
        self._done = True
        ep.answer_ids = self._ground(ep.answer.answer_lines) if ep.answer is not None else []
        ep.format_errors = check_format(ep, cfg.protocol, cfg.answer_k)
        comps = dict.fromkeys(COMPONENTS, 0.0)
        comps["format"] = format_reward(ep)
        comps["invocation"] = invocation_reward(ep)
        if ep.n_calls >= 2:  # the encoder's cache already holds the preferences' vectors
            with limit_threads(cfg.threads):
                comps["diversity"] = diversity_reward(ep, self.res.encoder.encode(ep.preferences))
        comps["hit"] = hit_reward(ep)
        comps["rank"] = rank_reward(ep, k=cfg.answer_k)
        comps["point"] = point_reward(ep, self.res.text_emb, self.res.item_vecs, repeats=cfg.point_repeats)
        comps["wasted"] = wasted_reward(ep, self._full_history)
        info = self._step_info(act, comps)
        valid_ids = [i for i in ep.answer_ids if i is not None]
        # The target's rank is its answer line: every line holds its position, grounded or not, repeated or
        # not (the same index the rank reward uses). The counts below are diagnostics only.
        line = hit_index(ep)
        rank = MISS if ep.format_errors or line is None else line
        seen = set(self._full_history.tolist())
        info.update(
            target=ep.target,
            answer_ids=list(ep.answer_ids),
            rank=rank,
            metrics=rank_metrics(np.array([rank])),
            hallucinated=sum(i is None for i in ep.answer_ids),
            seen=sum(i in seen for i in valid_ids),
            duplicates=len(valid_ids) - len(set(valid_ids)),
            format_errors=list(ep.format_errors),
        )
        return "", self._weighted(comps), True, False, info

    @property
    def trm_history(self) -> np.ndarray:
        """The current user's history as the TRM reads it (its last ``max_len`` items)."""
        return self._trm_history

    def render(self) -> str | None:
        """The transcript so far (``render_mode="ansi"``)."""
        if self.render_mode != "ansi" or self.episode is None:
            return None
        return self.episode.prompt + self.episode.response

    def config_dict(self) -> dict:
        """The configuration as plain data (for result files)."""
        return asdict(self.config)
