"""The text protocol (``docs/design.md``): tags, prompts, item lists, segment parsing, format checks.

This is the only module that writes or reads protocol text. :func:`parse` never raises on a ``str``:
agent mistakes come back as ``Action(kind="invalid", errors=...)``.

>>> p = ProtocolConfig()
>>> parse("I like comedies. <|begin_of_preference|> light comedy; 1990s <|end_of_preference|>", p).preference
'light comedy; 1990s'
>>> parse("no tags at all", p).kind
'invalid'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from deeprec_env.catalog import Catalog
from deeprec_env.config import check_fields

_ENUM = re.compile(r"^\s*(?:\d{1,3}\s*[.)\]:-]|[-*•])\s*")
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class ProtocolConfig:
    """Protocol strings and format rules. Defaults are the reference's."""

    think_open: str = "<think>"
    """Opens the reasoning (the prompt already contains it)."""
    think_close: str = "</think>"
    """Closes the reasoning; the answer follows it."""
    call_open: str = "<|begin_of_preference|>"
    """Opens a TRM call; its argument is free text, phrases joined by ';'."""
    call_close: str = "<|end_of_preference|>"
    """Closes a TRM call (a generation stop string)."""
    result_open: str = "<|begin_of_item_list|>"
    """Opens the item list the environment inserts."""
    result_close: str = "<|end_of_item_list|>"
    """Closes the item list the environment inserts."""
    answer_open: str = "<recommendation_list>"
    """Opens the final ranked list."""
    answer_close: str = "</recommendation_list>"
    """Closes the final ranked list (a generation stop string)."""
    role_words: tuple[str, ...] = ("Assistant", "assistant")
    """Words that must not appear in a response (a sign the model is role-playing both sides)."""
    placeholders: tuple[str, ...] = (
        "[user preference phrases, concatenated by ;]",
        "[Continue iterating through the process",
        "[retrieved item",
        "[interacted item",
        " to recommend]\n",
    )
    """Template text that must not be copied into a response."""
    reject_cjk: bool = True
    """Penalise CJK characters in the policy's text outside the answer (the reference does)."""
    max_segment_chars: int = 65_536
    """Longer segments are invalid and are not scanned (caps every regex)."""

    def __post_init__(self) -> None:
        check_fields(self)
        tags = [self.think_open, self.think_close, self.call_open, self.call_close, self.result_open,
                self.result_close, self.answer_open, self.answer_close]  # fmt: skip
        if any(not t for t in tags) or len(set(tags)) != len(tags):
            raise ValueError("protocol tags must be non-empty and distinct")
        if self.max_segment_chars < 1:
            raise ValueError(f"max_segment_chars={self.max_segment_chars}; must be >= 1")

    @property
    def tags(self) -> tuple[str, ...]:
        """Every tag string."""
        return (self.think_open, self.think_close, self.call_open, self.call_close, self.result_open,
                self.result_close, self.answer_open, self.answer_close)  # fmt: skip

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Generation stop strings: the call close and the answer close (add the tokenizer's EOS)."""
        return (self.call_close, self.answer_close)


@dataclass(frozen=True)
class Action:
    """One parsed policy segment."""

    kind: Literal["call", "answer", "invalid"]
    """What the segment does."""
    preference: str = ""
    """Normalised preference text of a call."""
    answer_lines: tuple[str, ...] = ()
    """Lines of the answer block (enumeration stripped), in order."""
    errors: tuple[str, ...] = ()
    """Why the segment is invalid (empty for valid ones)."""


def parse(text: str, p: ProtocolConfig, *, allow_empty: bool = False) -> Action:
    """Classify one segment as a call, an answer or an invalid action; never raises on a ``str``.

    ``allow_empty`` accepts an empty preference as a call without a preference (the reference rejects it).
    """
    if not isinstance(text, str):
        raise TypeError(f"action must be str, got {type(text).__name__}")
    if len(text) > p.max_segment_chars:
        return Action("invalid", errors=(f"segment too long ({len(text)} > {p.max_segment_chars} characters)",))
    n_call_open, n_call_close = text.count(p.call_open), text.count(p.call_close)
    n_ans_open, n_ans_close = text.count(p.answer_open), text.count(p.answer_close)
    errors: list[str] = []
    if p.result_open in text or p.result_close in text:
        errors.append("item-list tags are written by the environment, not the policy")
    if n_ans_open or n_ans_close:
        if n_call_open or n_call_close:
            errors.append("a segment holds either a call or the answer, not both")
        if n_ans_open != 1 or n_ans_close != 1:
            errors.append(f"answer needs exactly one {p.answer_open} and one {p.answer_close}")
        elif text.index(p.answer_open) > text.index(p.answer_close):
            errors.append(f"{p.answer_close} comes before {p.answer_open}")
        if errors:
            return Action("invalid", errors=tuple(errors))
        start = text.index(p.answer_open) + len(p.answer_open)
        end = text.index(p.answer_close)
        if text[end + len(p.answer_close) :].strip():
            return Action("invalid", errors=("text after the answer",))
        block = text[start:end].strip()
        lines = tuple(_ENUM.sub("", line).strip() for line in block.split("\n")) if block else ()
        return Action("answer", answer_lines=lines)
    if n_call_open or n_call_close:
        if n_call_open != 1 or n_call_close != 1:
            errors.append(f"one call per segment: found {n_call_open} {p.call_open} and {n_call_close} {p.call_close}")
        elif text.index(p.call_open) > text.index(p.call_close):
            errors.append(f"{p.call_close} comes before {p.call_open}")
        elif text[text.index(p.call_close) + len(p.call_close) :].strip():
            errors.append(f"text after {p.call_close} (the segment must end with the call)")
        if errors:
            return Action("invalid", errors=tuple(errors))
        raw = text[text.index(p.call_open) + len(p.call_open) : text.index(p.call_close)]
        pref = normalise_preference(raw)
        if not pref and not allow_empty:
            return Action("invalid", errors=("empty preference",))
        if any(t in pref for t in p.tags):
            return Action("invalid", errors=("tag text inside the preference",))
        return Action("call", preference=pref)
    errors.append(f"no call ({p.call_open} ... {p.call_close}) and no answer ({p.answer_open} ... {p.answer_close})")
    return Action("invalid", errors=tuple(errors))


def normalise_preference(text: str) -> str:
    r"""Strip double quotes and collapse white space (the reference's clean-up).

    >>> normalise_preference(' "light   comedy";\n 90s ')
    'light comedy; 90s'
    """
    return " ".join(text.replace('"', "").split())


def strip_title_line(line: str) -> str:
    """An answer line without annotations the model may copy from item lists (`` - categories: ...``)."""
    for sep in ("  - categories:", " - categories:", "\t"):
        if sep in line:
            line = line.split(sep, 1)[0]
    return line.strip()


# ----------------------------------------------------------------------------------------------
# Text the environment writes


def item_lines(catalog: Catalog, items) -> str:
    r"""Numbered ``Title\n  - categories: a, b`` lines (history and item lists share this format)."""
    out = []
    for n, i in enumerate(items, start=1):
        i = int(i)
        cats = ", ".join(catalog.categories[i])
        out.append(f"{n}. {catalog.titles[i]}\n  - categories: {cats}" if cats else f"{n}. {catalog.titles[i]}")
    return "\n".join(out)


def call_text(preference: str, p: ProtocolConfig, reasoning: str = "") -> str:
    """A policy segment that calls the TRM: ``reasoning <|begin_of_preference|> pref <|end_of_preference|>``."""
    return f"{reasoning} {p.call_open} {preference} {p.call_close}"


def answer_text(titles, p: ProtocolConfig, reasoning: str) -> str:
    """A final policy segment: reasoning, ``</think>`` and the numbered titles in the answer tags."""
    lines = "\n".join(f"{n}. {t}" for n, t in enumerate(titles, start=1))
    return f"{reasoning}\n{p.think_close}\n{p.answer_open}\n{lines}\n{p.answer_close}"


def item_list_text(catalog: Catalog, items, p: ProtocolConfig) -> str:
    r"""The tool result inserted after a call: ``<|begin_of_item_list|>\n1. ...<|end_of_item_list|>\n\n``."""
    return f"{p.result_open}\n{item_lines(catalog, items)}{p.result_close}\n\n"


def instructions(p: ProtocolConfig, k: int, must_call: bool) -> str:
    """The task description shared by the base-model and chat prompts (after the reference's wording)."""
    call_fmt = f"{p.call_open} [user preference phrases, concatenated by ;] {p.call_close}"
    return (
        "You are the assistant to make item recommendations for the user. You have no access to the "
        "candidate items, so you " + ("MUST" if must_call else "need to") + " call an item retrieval tool to "
        "find the items you want to recommend. The tool takes a description of the user's preference and "
        "returns a list of relevant items.\n"
        f"The format of input:\n{call_fmt}\n"
        f"The format of output:\n{p.result_open}\n1. [retrieved item 1]\n2. [retrieved item 2]\n...\n"
        f"n. [retrieved item n]\n{p.result_close}\n\n"
        "The user lists the items they interacted with, in order of interaction time. For example:\n"
        "1. [interacted item 1]\n2. [interacted item 2]\n...\nn. [interacted item n]\n\n"
        "To make recommendations:\n\n"
        f'1. Reason about the interaction history and describe the user\'s preference as "{call_fmt}" '
        "to call the item retrieval tool.\n\n"
        "2. **Quality over quantity**: even when you have found enough items, call the tool again with "
        "different preference descriptions to find better ones; explore different aspects of the user's "
        "preferences.\n\n"
        "3. **Iterative refinement**: after each call, analyse the returned items and adjust the next "
        "preference description, or explore another aspect.\n\n"
        "4. After gathering a diverse pool of items, rank the retrieved items by how likely the user is to "
        "interact with them, given the history.\n\n"
        f"5. Finally output the ranked item title list with the top {k} items.\n\n"
        f"The reasoning and the final ranked list are enclosed in {p.think_open} {p.think_close} and "
        f"{p.answer_open} {p.answer_close} tags, respectively. Your response follows this format:\n"
        f"{p.think_open}\n[Continue iterating through the process—reasoning before tool invocation, tool "
        "execution, and post-tool evaluation—until the desired items are found. Conclude by reasoning a "
        f"ranked item list based on the iterative refinements.]\n{p.think_close}\n{p.answer_open}\n"
        f"1. [item title 1 to recommend]\n2. [item title 2 to recommend]\n...\n"
        f"n. [item title n to recommend]\n{p.answer_close}\n\n"
        "Now, let's begin.\n\n"
    )


def base_prompt(history_text: str, p: ProtocolConfig, k: int, hint: str = "") -> str:
    """Prompt for a base (non-chat) model; it ends with an opened ``<think>``. ``hint``: :func:`hint_text` or ""."""
    return f"{instructions(p, k, must_call=False)}{hint}User:\n{history_text}\n\nAssistant:\n{p.think_open}\n"


def chat_user_message(history_text: str, p: ProtocolConfig, k: int, hint: str = "") -> str:
    r"""User message for a chat model; the policy applies its chat template and appends ``<think>\n``."""
    return f"{instructions(p, k, must_call=True)}{hint}User interaction history:\n{history_text}\n\n"


HINT = "Hint: the item the user will choose next has these categories: "
"""Start of the line a ``target_hint`` prompt adds before the history (``EnvConfig.target_hint``)."""


def hint_text(categories: Sequence[str]) -> str:
    r"""The hint line (and a blank line) naming the target's ``categories``: privileged, a trainer's positive control.

    >>> hint_text(("Comedy", "Romance"))
    'Hint: the item the user will choose next has these categories: Comedy, Romance.\n\n'
    """
    return f"{HINT}{', '.join(categories) or 'none'}.\n\n"


def read_hint(prompt: str) -> list[str] | None:
    r"""The categories a prompt's hint line names (:func:`hint_text`); None when the prompt has no hint.

    >>> read_hint("..." + hint_text(("Comedy", "Romance")) + "User:\n1. A")
    ['Comedy', 'Romance']
    """
    if HINT not in prompt:
        return None
    names = prompt.split(HINT, 1)[1].split(".\n", 1)[0]
    return [] if names == "none" else [c.strip() for c in names.split(",") if c.strip()]


def preference_phrases(preference: str) -> set[str]:
    """The phrases of a preference, lower case, split at ``;`` and ``,``, without end punctuation.

    >>> sorted(preference_phrases(" Horror;  thriller. "))
    ['horror', 'thriller']
    """
    phrases = (w.strip().strip(".!?:").strip().lower() for w in re.split(r"[;,]", preference))
    return {w for w in phrases if w}


def copies_hint(preference: str, categories: Sequence[str]) -> bool:
    """Whether a preference names exactly the hint's ``categories`` (any order, case, separator or end punctuation).

    >>> copies_hint("comedy;  Romance.", ("Comedy", "Romance")), copies_hint("Comedy", ("Comedy", "Romance"))
    (True, False)
    """
    return bool(categories) and preference_phrases(preference) == {c.lower() for c in categories}


# ----------------------------------------------------------------------------------------------
# The episode record and the whole-response format check


@dataclass
class Episode:
    """Everything the rewards and metrics need about one finished (or running) episode."""

    user: int
    """User index in the dataset."""
    target: int
    """Held-out item number."""
    history: np.ndarray
    """Items shown in the prompt, oldest first."""
    prompt: str = ""
    """Observation returned by reset."""
    parts: list[tuple[str, str]] = field(default_factory=list)
    """Response pieces in order: ``("policy", text)`` or ``("env", text)``."""
    preferences: list[str] = field(default_factory=list)
    """Normalised preference of each call."""
    retrieved: list[np.ndarray] = field(default_factory=list)
    """Item ids returned by each call."""
    answer: Action | None = None
    """The answer action, if one was given."""
    answer_ids: list[int | None] = field(default_factory=list)
    """Each answer line grounded to an item number (None: no such item)."""
    invalid: list[tuple[str, ...]] = field(default_factory=list)
    """Errors of every invalid segment."""
    end_reason: str = ""
    """Why the environment ended the episode before an answer (budget spent, too many rejections), if so."""
    format_errors: list[str] = field(default_factory=list)
    """Whole-response format failures (filled when the episode ends)."""
    patterns: tuple[str, ...] = ()
    """Strings whose occurrences are counted once per part as parts are added (see :meth:`count`)."""
    _counts: list[dict[str, int]] = field(default_factory=list, repr=False)

    def add(self, kind: Literal["policy", "env"], text: str) -> None:
        """Append a response part and count the patterns in it (so the final checks do not rescan)."""
        self.parts.append((kind, text))
        self._counts.append({pat: text.count(pat) for pat in self.patterns})

    def count(self, pattern: str) -> int:
        """Occurrences of ``pattern`` in the response, summed over the per-part counts.

        A match never spans two parts: every environment part starts with the item-list tag and ends
        with a blank line, and two policy parts are never adjacent.
        """
        if pattern in self.patterns and len(self._counts) == len(self.parts):
            return sum(c[pattern] for c in self._counts)
        return self.response.count(pattern)

    def contains(self, pattern: str) -> bool:
        """Whether ``pattern`` occurs in the response."""
        return self.count(pattern) > 0

    def after_last(self, marker: str) -> str:
        """The response after the last ``marker`` (the whole response if it never occurs)."""
        for j in range(len(self.parts) - 1, -1, -1):
            text = self.parts[j][1]
            if marker in text:
                return text.rpartition(marker)[2] + "".join(t for _, t in self.parts[j + 1 :])
        return self.response

    @property
    def response(self) -> str:
        """The response so far: policy segments and inserted item lists, concatenated."""
        return "".join(t for _, t in self.parts)

    @property
    def n_calls(self) -> int:
        """Number of valid TRM calls."""
        return len(self.preferences)


def format_patterns(p: ProtocolConfig) -> tuple[str, ...]:
    """Every string :func:`check_format` counts (give it to :class:`Episode` as ``patterns``)."""
    return (
        *p.tags,
        f"{p.result_open}\n",
        f"{p.result_open}\n1.",
        f"{p.result_close}\n",
        *p.role_words,
        *p.placeholders,
    )


def check_format(ep: Episode, p: ProtocolConfig, k: int) -> list[str]:
    """Whole-response format checks of ``docs/design.md`` (the reference's list); empty means format = 0."""
    errs: list[str] = []
    if ep.invalid:
        errs.append(f"{len(ep.invalid)} invalid segment(s)")
    if ep.end_reason:
        errs.append(ep.end_reason)
    counts = {
        ep.count(p.call_open),
        ep.count(p.call_close),
        ep.count(p.result_open),
        ep.count(f"{p.result_open}\n"),
        ep.count(f"{p.result_open}\n1."),
        ep.count(p.result_close),
        ep.count(f"{p.result_close}\n"),
    }
    if len(counts) != 1:
        errs.append("call and item-list tags are not balanced")
    if ep.n_calls == 0:
        errs.append("no tool call")
    if any(ep.contains(w) for w in p.role_words):
        errs.append("role word in the response")
    if any(ep.contains(ph) for ph in p.placeholders):
        errs.append("template placeholder copied")
    if ep.count(p.think_open) != 0 or ep.count(p.think_close) != 1:
        errs.append(f"needs no {p.think_open} and exactly one {p.think_close}")
    after = ep.after_last(p.think_close)
    if not (ep.count(p.answer_open) == ep.count(p.answer_close) == 1 == after.count(p.answer_open)
            == after.count(p.answer_close)):  # fmt: skip
        errs.append(f"needs exactly one {p.answer_open} ... {p.answer_close} after {p.think_close}")
    if not ep.after_last(p.result_close).partition(p.think_close)[0].strip():
        errs.append("no reasoning after the last item list")
    if ep.answer is None:
        errs.append("no answer")
    else:
        block = "\n".join(ep.answer.answer_lines)
        inner = [t.strip("<|/>") for t in (p.call_open, p.call_close, p.result_open, p.result_close)]
        if any(t in block for t in inner):
            errs.append("tag text inside the answer")
        if len(ep.answer.answer_lines) != k:
            errs.append(f"answer has {len(ep.answer.answer_lines)} lines, needs {k}")
    if p.reject_cjk:
        outside = "".join(t for kind, t in ep.parts if kind == "policy")
        if p.answer_open in outside and p.answer_close in outside:  # answer titles come from the catalogue
            head, rest = outside.split(p.answer_open, 1)
            outside = head + rest.split(p.answer_close, 1)[-1]
        if not outside.isascii() and _CJK.search(outside):
            errs.append("CJK characters in the response")
    return errs


# ----------------------------------------------------------------------------------------------
# Reading environment text back (for scripted agents)

_NUMBERED = re.compile(r"^(\d{1,4})\. (.*)$")


def read_items(text: str) -> list[tuple[str, tuple[str, ...]]]:
    r"""``(title, categories)`` of every numbered item in an item list or a prompt's history block.

    >>> read_items("1. Heat (1995)\n  - categories: Crime, Thriller\n2. Babe (1995)")
    [('Heat (1995)', ('Crime', 'Thriller')), ('Babe (1995)', ())]
    """
    out: list[tuple[str, tuple[str, ...]]] = []
    for line in text[:2_000_000].split("\n"):
        m = _NUMBERED.match(line)
        if m:
            out.append((m.group(2).strip(), ()))
        elif line.strip().startswith("- categories:") and out:
            cats = tuple(c.strip() for c in line.split(":", 1)[1].split(",") if c.strip())
            out[-1] = (out[-1][0], cats)
    return out


def history_block(prompt: str) -> str:
    """The user's history part of a base or chat prompt."""
    for start, end in (("\nUser:\n", "\n\nAssistant:"), ("User interaction history:\n", None)):
        if start in prompt:
            block = prompt.rsplit(start, 1)[1]
            return block.split(end, 1)[0] if end and end in block else block
    return ""
