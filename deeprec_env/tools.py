"""DeepRec with tool calls (``DeepRecTools-v0``), and the class TRL's ``environment_factory`` takes.

The policy calls ``recommend(preference)`` (the TRM) and finishes with ``answer(items)``, the tools of
its chat template (:data:`TOOLS` is their JSON schema, for ``tokenizer.apply_chat_template(tools=...)``);
each retrieved item list comes back as the tool's result. Every tool call is written as the text
protocol's segment (:func:`~deeprec_env.protocol.call_text`, :func:`~deeprec_env.protocol.answer_text`)
and stepped through :class:`~deeprec_env.env.DeepRecEnv`, so episodes, rewards, grounding and metrics
are the text environment's: a tool call cannot break the tag format (a call without text gets the
reasoning :data:`NO_CONTENT`), so the format reward judges the calls (budget, answer length, titles that
name items).

The environment card is the docstring of :class:`DeepRecToolEnv`; TRL's class is :class:`DeepRecTRLEnv`.
"""

from __future__ import annotations

import json
from typing import Any

import gymnasium as gym

from deeprec_env.env import DeepRecEnv
from deeprec_env.protocol import answer_text, call_text

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "recommend",
            "description": "Retrieve catalogue items that match a description of the user's preference.",
            "parameters": {
                "type": "object",
                "properties": {
                    "preference": {
                        "type": "string",
                        "description": "what the user likes, in words (phrases separated by ';')",
                    }
                },
                "required": ["preference"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "answer",
            "description": "Submit the final ranked list of item titles (ends the episode).",
            "parameters": {
                "type": "object",
                "properties": {
                    "items": {"type": "array", "items": {"type": "string"}, "description": "titles, best first"}
                },
                "required": ["items"],
            },
        },
    },
]
"""The two tools in the OpenAI / transformers function-schema format."""

NO_CONTENT = "(tool call)"
"""The reasoning written into a call's segment when the call comes without text: the tag protocol's checks
for reasoning then pass, so the format reward judges the calls themselves."""


def tool_user_message(history_text: str, k: int) -> str:
    """The user message of the tool variant: the task, the two tools, the history."""
    return (
        "You are the assistant to make item recommendations for the user. You have no access to the "
        "candidate items: call the `recommend` tool with a description of the user's preference (phrases "
        "separated by ';') and it returns a list of relevant items. Call it several times with different "
        "descriptions to explore different aspects of the user's preferences, reasoning about the returned "
        f"items before each new call. Finally call the `answer` tool with the {k} titles most likely to be "
        "the user's next interaction, best first, copied from the retrieved lists.\n\n"
        f"User interaction history (oldest first):\n{history_text}\n"
    )


def parse_tool_call(action: Any) -> tuple[str, dict, str]:
    """``(name, arguments, content)`` of a tool call given as a dict or its JSON text.

    Accepted shapes: ``{"name": ..., "arguments": {...}}``, the same under ``"function"`` (OpenAI's
    ``tool_calls`` entry), arguments as a JSON string, and an optional ``"content"`` (the reasoning before
    the call). Raises ``ValueError`` with the reason for anything else.
    """
    if isinstance(action, str):
        try:
            action = json.loads(action)
        except json.JSONDecodeError as err:
            raise ValueError(f"a tool call is a JSON object, got text that is not JSON ({err.msg})") from None
    if not isinstance(action, dict):
        raise ValueError(f"a tool call is a dict or its JSON text, got {type(action).__name__}")
    content = action.get("content") or ""
    call = action.get("function", action)
    if not isinstance(call, dict) or "name" not in call:
        raise ValueError("a tool call needs a 'name' ('recommend' or 'answer')")
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ValueError("the tool call's 'arguments' are not a JSON object") from None
    if not isinstance(args, dict) or not isinstance(content, str):
        raise ValueError("'arguments' must be an object and 'content' a string")
    name = call["name"]
    if name == "recommend":
        if not isinstance(args.get("preference"), str) or set(args) != {"preference"}:
            raise ValueError("recommend takes one argument, 'preference' (a string)")
    elif name == "answer":
        items = args.get("items")
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items) or set(args) != {"items"}:
            raise ValueError("answer takes one argument, 'items' (a list of title strings)")
    else:
        raise ValueError(f"unknown tool {name!r}; the tools are 'recommend' and 'answer'")
    return name, args, content


class DeepRecToolEnv(gym.Env):
    """DeepRecTools-v0: DeepRec where the policy acts through ``recommend`` and ``answer`` tool calls.

    ## Description

    The text environment's episodes (:class:`~deeprec_env.env.DeepRecEnv`, ``prompt="chat"``) with the
    tag protocol replaced by two tools (:data:`TOOLS`). Each tool call becomes the equivalent text
    segment, so rewards, metrics, ``info`` and episode ends are the text environment's.

    ## Action Space

    A tool call: a dict ``{"name": "recommend", "arguments": {"preference": "..."}}`` or
    ``{"name": "answer", "arguments": {"items": ["title", ...]}}`` (optionally ``"content"``: the
    reasoning before it, and OpenAI's ``{"function": {...}}`` nesting), or its JSON text. A malformed call
    (not JSON, an unknown tool, wrong arguments) is an invalid segment: penalised and flagged as in the
    text environment (``info["tool_error"]`` says why), never an exception; an action of another type
    (None, bytes, a number) raises ``TypeError``. The space is the text environment's ``Text`` space (the
    JSON form).

    ## Observation Space

    Text: the user message at reset (``info["messages"]`` and ``info["tools"]`` are the chat to render),
    then the tool result (the item list) after ``recommend``, or feedback after an invalid call.

    ## Rewards, Starting State, Episode End

    The text environment's (its card). ``answer`` ends the episode.

    ## Version History

    - v0 (deeprec-env 0.3): first release.

    Args:
        render_mode: None or ``"ansi"`` (the text environment's transcript).
        text_env: use this text environment (else one is built from ``kwargs``; ``prompt`` is ``"chat"``).
        **kwargs: :class:`~deeprec_env.env.EnvConfig` fields.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, render_mode: str | None = None, text_env: DeepRecEnv | None = None, **kwargs: Any) -> None:
        if text_env is None:
            if kwargs.get("prompt", "chat") != "chat":
                raise ValueError("the tool variant is a chat protocol: prompt must be 'chat'")
            text_env = DeepRecEnv(render_mode=render_mode, **{**kwargs, "prompt": "chat"})
        self.text_env = text_env
        self.render_mode = render_mode
        self.config = text_env.config
        self.catalog = text_env.catalog
        self.observation_space = text_env.observation_space
        self.action_space = text_env.action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """Start an episode (``options`` as the text environment's: ``user`` or ``example``)."""
        super().reset(seed=seed)
        _, info = self.text_env.reset(seed=seed, options=options)
        from deeprec_env.protocol import item_lines

        message = tool_user_message(item_lines(self.catalog, self.text_env.episode.history), self.config.answer_k)
        info["messages"] = [{"role": "user", "content": message}]
        info["tools"] = TOOLS
        return message, info

    def segment(self, action: Any) -> tuple[str, str | None]:
        """The text segment for ``action`` and the reason it is invalid (None when it is a valid call)."""
        p = self.config.protocol
        try:
            name, args, content = parse_tool_call(action)
        except ValueError as err:
            return "", str(err)
        content = content.strip() or NO_CONTENT
        if name == "recommend":
            return call_text(args["preference"], p, content), None
        return answer_text(args["items"], p, content), None

    def step(self, action: Any) -> tuple[str, float, bool, bool, dict]:
        """Execute one tool call (a dict or its JSON text; anything else is a ``TypeError``)."""
        if not isinstance(action, str | dict):
            raise TypeError(f"action must be a tool call (a dict or its JSON text), got {type(action).__name__}")
        text, error = self.segment(action)
        obs, reward, terminated, truncated, info = self.text_env.step(text)
        if error is not None:
            info["tool_error"] = error
        return obs, reward, terminated, truncated, info

    def render(self) -> str | None:
        """The underlying text transcript (``render_mode="ansi"``)."""
        return self.text_env.render()


class DeepRecTRLEnv:
    """DeepRec for TRL's ``GRPOTrainer(environment_factory=...)``: the tools are ``recommend`` and ``answer``.

    TRL exposes the public methods as tools, calls ``reset(**row)`` before each rollout (``row`` is the
    dataset row: its ``user`` picks the episode) and ``get_reward()`` after it. Build the dataset with
    ``agents.trl_adapter.prompt_dataset(tools=True, ...)``: its prompts are this variant's user messages.
    An episode the model ends without calling ``answer`` fails the format check (the text environment's
    reward for a missing answer).

        GRPOTrainer(model=..., environment_factory=lambda: DeepRecTRLEnv(stage="rec"),
                    train_dataset=prompt_dataset(tools=True, stage="rec"), args=GRPOConfig(...))

    Args:
        **env_kwargs: :class:`~deeprec_env.env.EnvConfig` fields.
    """

    def __init__(self, **env_kwargs: Any) -> None:
        from deeprec_env.env import EnvConfig
        from deeprec_env.resources import get_resources

        kwargs = {**env_kwargs, "prompt": "chat"}
        self._env = DeepRecToolEnv(text_env=DeepRecEnv(resources=get_resources(EnvConfig(**kwargs)), **kwargs))
        self._return = 0.0
        self._done = True
        self._info: dict = {}

    def reset(self, **row: Any) -> None:
        """Start the episode of ``row["user"]`` (a random one without it); the prompt is the dataset's."""
        user = row.get("user")
        self._env.reset(options=None if user is None else {"user": int(user)})
        self._return, self._done, self._info = 0.0, False, {}

    def _call(self, action: dict) -> str:
        if self._done:
            return "The episode has ended: no more tool calls."
        obs, reward, terminated, truncated, info = self._env.step(action)
        self._return += float(reward)
        self._done = bool(terminated or truncated)
        self._info = info
        return obs if not self._done else "Recommendation list received."

    def recommend(self, preference: str) -> str:
        """Retrieve catalogue items that match a description of the user's preference.

        Args:
            preference: what the user likes, in words (phrases separated by ';').

        Returns:
            The retrieved items, one numbered title per line with its categories.
        """
        return self._call({"name": "recommend", "arguments": {"preference": preference}})

    def answer(self, items: list[str]) -> str:
        """Submit the final ranked list of item titles; this ends the episode.

        Args:
            items: item titles, best first, copied from the retrieved lists.

        Returns:
            A confirmation.
        """
        return self._call({"name": "answer", "arguments": {"items": items}})

    def get_reward(self) -> float:
        """The episode's return; an episode still open (no ``answer``) is ended as a format failure first."""
        if not self._done:
            self._call({"name": "answer", "arguments": {"items": []}})  # no answer: the format check fails
        return self._return
