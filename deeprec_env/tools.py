"""DeepRec with tool calls (``actions="tools"``, registered as ``DeepRecTools-v0``), and TRL's environment class.

The policy calls ``recommend(preference)`` (the TRM) and finishes with ``answer(items)``, the tools of
its chat template (:data:`TOOLS` is their JSON schema, for ``tokenizer.apply_chat_template(tools=...)``);
each retrieved item list comes back as the tool's result. :func:`tool_segment` writes every tool call as
the text protocol's segment (:func:`~deeprec_env.protocol.call_text`,
:func:`~deeprec_env.protocol.answer_text`), which :class:`~deeprec_env.env.DeepRecEnv` then steps, so
episodes, rewards, grounding and metrics are the text protocol's, and the vector env batches the calls.
A tool call cannot break the tag format (a call without text gets the reasoning :data:`NO_CONTENT`), so
the format reward judges the calls (budget, answer length, titles that name items). A malformed call
(not JSON, an unknown tool, wrong arguments) is an invalid segment: penalised and flagged
(``info["tool_error"]`` says why); an action that is neither a dict nor a string raises ``TypeError``.

:class:`DeepRecTRLEnv` is the class TRL's ``GRPOTrainer(environment_factory=...)`` takes.
"""

from __future__ import annotations

import json
from typing import Any

from deeprec_env.protocol import ProtocolConfig, answer_text, call_text

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


def tool_user_message(history_text: str, k: int, hint: str = "") -> str:
    """The user message of the tool variant: the task, the two tools, the history (after ``hint``, if any)."""
    return (
        "You are the assistant to make item recommendations for the user. You have no access to the "
        "candidate items: call the `recommend` tool with a description of the user's preference (phrases "
        "separated by ';') and it returns a list of relevant items. Call it several times with different "
        "descriptions to explore different aspects of the user's preferences, reasoning about the returned "
        f"items before each new call. Finally call the `answer` tool with the {k} titles most likely to be "
        "the user's next interaction, best first, copied from the retrieved lists.\n\n"
        f"{hint}User interaction history (oldest first):\n{history_text}\n"
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


def tool_segment(action: Any, p: ProtocolConfig) -> tuple[str, str | None]:
    """The text segment for tool call ``action`` and why it is invalid (None for a valid call).

    An invalid call becomes the empty segment, which the environment penalises as an invalid action.
    """
    try:
        name, args, content = parse_tool_call(action)
    except ValueError as err:
        return "", str(err)
    content = content.strip() or NO_CONTENT
    if name == "recommend":
        return call_text(args["preference"], p, content), None
    return answer_text(args["items"], p, content), None


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
        from deeprec_env.env import DeepRecEnv, EnvConfig
        from deeprec_env.resources import get_resources

        kwargs = {**env_kwargs, "prompt": "chat", "actions": "tools"}
        self._env = DeepRecEnv(resources=get_resources(EnvConfig(**kwargs)), **kwargs)
        self._return = 0.0
        self._done = True

    def reset(self, **row: Any) -> None:
        """Start the episode of ``row["user"]`` (a random one without it); the prompt is the dataset's."""
        user = row.get("user")
        self._env.reset(options=None if user is None else {"user": int(user)})
        self._return, self._done = 0.0, False

    def _call(self, action: dict) -> str:
        if self._done:
            return "The episode has ended: no more tool calls."
        obs, reward, terminated, truncated, _ = self._env.step(action)
        self._return += float(reward)
        self._done = bool(terminated or truncated)
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
