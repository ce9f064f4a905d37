"""Hostile actions never crash the environment, never hang it, and never produce a non-finite reward."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeprec_env.testing import HOSTILE_PIECES, fuzz_run

ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=())  # surrogates too


@pytest.mark.parametrize("mode", ["end", "feedback"])
def test_fuzz_run_on_the_tiny_env(make_env, mode):
    stats = fuzz_run(lambda: make_env(invalid_action=mode), 400, seed=3, hang_s=5.0, huge_every=100)
    assert stats["actions"] == 400 and stats["episodes"] > 20
    assert (stats["crashes"], stats["hangs"], stats["non_finite"], stats["outside_space"]) == (0, 0, 0, 0), stats
    assert stats["errors"] == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    segments=st.lists(
        st.lists(st.one_of(st.sampled_from(HOSTILE_PIECES), st.text(ANY_CHAR, max_size=30)), max_size=12).map("".join),
        min_size=1,
        max_size=6,
    ),
    mode=st.sampled_from(["end", "feedback"]),
)
def test_any_string_is_a_legal_action(make_env, segments, mode):
    env = make_env(invalid_action=mode)
    env.reset(seed=0)
    for seg in segments:
        obs, r, term, trunc, info = env.step(seg)
        assert np.isfinite(r) and obs in env.observation_space
        assert isinstance(info["is_action_valid"], bool)
        if term or trunc:
            env.reset(seed=1)


def test_lone_surrogates_in_calls_and_answers(make_env):
    env = make_env(invalid_action="feedback")
    env.reset(seed=0)
    _, _, _, _, info = env.step("<|begin_of_preference|> drama \udbc2 \ud800x <|end_of_preference|>")
    assert info["is_action_valid"] and len(info["retrieved"]) == env.config.retrieval_k
    answer = "\n".join(f"{n}. \udfff{env.catalog.titles[n]}\u202e" for n in range(1, 11))
    _, r, term, _, info = env.step(f"ok\n</think>\n<recommendation_list>\n{answer}\n</recommendation_list>")
    assert term and np.isfinite(r)
