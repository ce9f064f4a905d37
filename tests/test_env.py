import time

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deeprec_env  # noqa: F401  (registers the ids)
from deeprec_env.rewards import COMPONENTS

CALL = "<|begin_of_preference|> {} <|end_of_preference|>"


def answer_segment(titles, reasoning="Ranking the retrieved items."):
    lines = "\n".join(f"{i}. {t}" for i, t in enumerate(titles, start=1))
    return f"{reasoning}\n</think>\n<recommendation_list>\n{lines}\n</recommendation_list>"


def other_titles(env, target, n):
    cat = env.catalog
    return [cat.titles[i] for i in range(1, cat.num_embeddings) if cat.titles[i] != cat.titles[target]][:n]


def run_scripted(env, user_example=0, first=True):
    obs, info = env.reset(options={"example": user_example})
    target = env.episode.target
    rewards, infos = [], []
    for seg in (
        "The user watches dramas. " + CALL.format("drama"),
        "Now something lighter. " + CALL.format("comedy; action"),
    ):
        obs, r, term, trunc, info = env.step(seg)
        assert not term and not trunc and info["is_action_valid"]
        assert obs.startswith("<|begin_of_item_list|>\n1. ") and obs.endswith("<|end_of_item_list|>\n\n")
        rewards.append(r)
        infos.append(info)
    titles = other_titles(env, target, 9)
    titles.insert(0 if first else 9, env.catalog.titles[target])
    obs, r, term, trunc, info = env.step(answer_segment(titles))
    assert term and not trunc and obs == ""
    return rewards + [r], infos + [info]


def point_by_hand(env, answer_ids, target):
    te, iv = env.res.text_emb, env.res.item_vecs
    n = len(answer_ids)
    w = np.array([(1 - i / n) ** 2 for i in range(n)])
    sims = np.array([0.5 * (te[i] @ te[target] + iv[i] @ iv[target]) for i in answer_ids])
    return 10 * float((w * sims).sum() / w.sum())


def test_scripted_episode_rec_stage(make_env):
    env = make_env(stage="rec")
    rewards, infos = run_scripted(env)
    final = infos[-1]
    assert final["format_errors"] == []
    c = final["reward_components"]
    assert c["format"] == 0.0 and c["hit"] == 1.0 and c["rank"] == pytest.approx(0.2 * 10)
    assert c["point"] == pytest.approx(point_by_hand(env, final["answer_ids"], final["target"]), abs=1e-5)
    assert sum(rewards) == pytest.approx(1 + 2.0 + c["point"])
    assert final["metrics"]["recall@1"] == 1.0 and final["metrics"]["ndcg@10"] == 1.0
    assert final["hallucinated"] == 0 and final["duplicates"] == 0


def test_scripted_episode_rank_last(make_env):
    env = make_env(stage="rec")
    _, infos = run_scripted(env, first=False)
    c = infos[-1]["reward_components"]
    assert c["hit"] == 1.0 and c["rank"] == pytest.approx(0.2 * 1)
    assert infos[-1]["rank"] == 9 and infos[-1]["metrics"]["recall@5"] == 0.0


def _answer_with_target_at(env, lines_above):
    """Episode with one call, then an answer whose lines ``lines_above`` precede the target."""
    env.reset(options={"example": 3})
    target = env.episode.target
    env.step("Drama fan. " + CALL.format("drama"))
    fill = other_titles(env, target, 10)
    lines = [*lines_above, env.catalog.titles[target]]
    lines += fill[len(fill) - (10 - len(lines)) :] if len(lines) < 10 else []
    _, _, term, _, info = env.step(answer_segment(lines))
    assert term and info["format_errors"] == []
    return info


@pytest.mark.parametrize("n_junk", [6, 9])
def test_metrics_count_unmatched_lines_above_the_target(make_env, n_junk):
    env = make_env(stage="rec")
    info = _answer_with_target_at(env, [f"Totally Invented Film {i}" for i in range(n_junk)])
    assert info["hallucinated"] == n_junk
    assert info["rank"] == n_junk  # the target's answer line, as the rank reward counts it
    assert info["reward_components"]["rank"] == pytest.approx(0.2 * (10 - n_junk))
    assert info["metrics"]["recall@1"] == 0.0 and info["metrics"]["recall@5"] == 0.0
    assert info["metrics"]["ndcg@10"] == pytest.approx(1 / np.log2(n_junk + 2))


def test_metrics_count_repeated_lines_above_the_target(make_env):
    env = make_env(stage="rec")
    env.reset(options={"example": 3})
    other = other_titles(env, env.episode.target, 1)[0]
    info = _answer_with_target_at(env, [other, other, other])
    assert info["duplicates"] == 2 + sum(i == info["answer_ids"][0] for i in info["answer_ids"][4:])
    assert info["rank"] == 3 and info["metrics"]["recall@1"] == 0.0 and info["metrics"]["recall@5"] == 1.0
    assert info["metrics"]["ndcg@5"] == pytest.approx(1 / np.log2(5))
    assert info["reward_components"]["rank"] == pytest.approx(0.2 * 7)


@pytest.mark.parametrize("repeats", [False, True])
def test_point_scores_a_repeated_item_once_unless_asked(make_env, repeats):
    # the reference scores every line, so one close item written ten times outscores a real list
    env = make_env(stage="rec", point_repeats=repeats)
    env.reset(options={"example": 3})
    target = env.episode.target
    others = [i for i in range(1, env.catalog.num_embeddings) if env.catalog.titles[i] != env.catalog.titles[target]]
    close = max(others, key=lambda i: env.res.item_vecs[i] @ env.res.item_vecs[target])
    env.step("Dramas. " + CALL.format("drama"))
    _, _, _, _, info = env.step(answer_segment([env.catalog.titles[close]] * 10))
    assert info["answer_ids"] == [close] * 10 and info["duplicates"] == 9
    once = point_by_hand(env, [close], target) * 1.0 / sum((1 - i / 10) ** 2 for i in range(10))
    expected = point_by_hand(env, [close] * 10, target) if repeats else once
    assert info["reward_components"]["point"] == pytest.approx(expected, abs=1e-5)
    assert info["reward_components"]["point"] > 0


def test_scripted_episode_coldstart_stage(make_env):
    env = make_env(stage="coldstart")
    rewards, infos = run_scripted(env)
    c = infos[-1]["reward_components"]
    e = env.res.encoder.encode(["drama", "comedy; action"])
    diversity = 0.2 * (1 - float(e[0] @ e[1]))
    assert c["invocation"] == 0.5 and c["diversity"] == pytest.approx(diversity, abs=1e-6)
    assert sum(rewards) == pytest.approx(0 + 0.5 + diversity)


def test_reward_is_weighted_sum_of_components(make_env):
    weights = {"format": 2.0, "hit": 0.5, "point": 0.1, "retrieval_hit": 3.0, "invocation": 1.0}
    env = make_env(reward_weights=weights)
    for ex in range(5):
        rewards, infos = run_scripted(env, ex)
        for r, info in zip(rewards, infos, strict=True):
            comps = info["reward_components"]
            assert set(comps) == set(COMPONENTS)
            assert r == pytest.approx(sum(weights.get(k, 0) * v for k, v in comps.items()))


def test_retrieval_hit_credit(make_env):
    env = make_env(reward_weights={"retrieval_hit": 1.0}, retrieval_k=40)  # catalogue of ~40 items
    env.reset(options={"example": 0})
    _, r, _, _, info = env.step(CALL.format("drama"))
    ids = np.array(info["retrieved"])
    pos = np.flatnonzero(ids == env.episode.target)
    assert len(pos) == 1 and r == pytest.approx(1 / np.log2(pos[0] + 2))
    _, r2, _, _, _ = env.step(CALL.format("drama"))
    assert r2 == 0.0  # only the first retrieval of the target earns credit


def test_format_failures(make_env):
    env = make_env()
    env.reset(seed=1)
    env.step(CALL.format("drama"))
    titles = other_titles(env, env.episode.target, 9)  # 9 lines, not 10
    _, r, term, _, info = env.step(answer_segment(titles))
    assert term and info["reward_components"]["format"] == -1.0
    assert any("needs 10" in e for e in info["format_errors"])
    assert info["rank"] == -1 and info["metrics"]["recall@10"] == 0.0

    env.reset(seed=1)  # answer without any call
    _, r, term, _, info = env.step(answer_segment(other_titles(env, env.episode.target, 10)))
    assert "no tool call" in info["format_errors"] and r == -1.0

    env.reset(seed=1)  # no reasoning after the last item list
    env.step(CALL.format("drama"))
    _, _, _, _, info = env.step(answer_segment(other_titles(env, env.episode.target, 10), reasoning=""))
    assert "no reasoning after the last item list" in info["format_errors"]

    env.reset(seed=1)  # role word
    env.step("Assistant: " + CALL.format("drama"))
    _, _, _, _, info = env.step(answer_segment(other_titles(env, env.episode.target, 10)))
    assert "role word in the response" in info["format_errors"]


def test_invalid_ends_episode_by_default(make_env):
    env = make_env()
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step("I think the user likes films.")
    assert term and not trunc and not info["is_action_valid"] and r == -1.0
    with pytest.raises(RuntimeError, match="finished episode"):
        env.step("anything")


def test_feedback_mode(make_env):
    env = make_env(invalid_action="feedback", max_invalid=2)
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step("no tags")
    assert not term and not trunc and r == -1.0 and "invalid action" in obs
    assert info["reward_components"]["format"] == -1.0
    env.step(CALL.format("drama"))
    _, r, term, _, info = env.step(answer_segment(other_titles(env, env.episode.target, 10)))
    assert term and info["format_errors"] == []  # rejected segments are not part of the transcript
    env.reset(seed=0)
    for _ in range(2):
        env.step("still no tags")
    _, r, term, trunc, info = env.step("and again")
    assert term and not trunc and info["reward_components"]["format"] == -1.0


def test_call_budget_ends_the_episode(make_env):
    env = make_env(max_calls=8)
    env.reset(seed=0)
    for i in range(8):
        _, _, term, trunc, _ = env.step(CALL.format(f"drama {i}"))
        assert not term and not trunc
    _, r, term, trunc, info = env.step(CALL.format("one more"))
    assert term and not trunc and r == -1.0
    assert any("call budget" in e for e in info["format_errors"])


def test_dedup_and_mask_history(make_env):
    env = make_env(dedup_retrieved=True, mask_history=True, retrieval_k=5)
    env.reset(seed=3)
    seen = set()
    history = set(env.split.history(env._example, 10**9).tolist())
    for _ in range(3):
        _, _, _, _, info = env.step(CALL.format("drama"))
        ids = set(info["retrieved"])
        assert not ids & seen and not ids & history
        seen |= ids


def test_same_seed_same_episode(make_env):
    a, b = make_env(), make_env()
    oa, ia = a.reset(seed=42)
    ob, ib = b.reset(seed=42)
    assert oa == ob and ia["user"] == ib["user"]
    ra = a.step(CALL.format("drama"))
    rb = b.step(CALL.format("drama"))
    assert ra[0] == rb[0] and np.array_equal(ra[4]["retrieved"], rb[4]["retrieved"])
    u = ia["user"]
    assert a.reset(options={"user": u})[0] == b.reset(seed=7, options={"user": u})[0]
    with pytest.raises(ValueError, match="unknown reset options"):
        a.reset(options={"usr": 1})


def test_counts_and_substring_match(make_env):
    env = make_env(match="substring")
    env.reset(options={"example": 2})
    target = env.episode.target
    history_item = int(env.split.history(2, 10**9)[-1])
    cat = env.catalog
    env.step("Drama fan. " + CALL.format("drama"))
    lines = [
        f"My pick: {cat.titles[target]} (great)",
        "Totally Invented Film 3000",
        cat.titles[history_item],
        cat.titles[history_item],
    ] + other_titles(env, target, 12)[:6]
    _, _, _, _, info = env.step(answer_segment(lines))
    assert info["answer_ids"][0] == target and info["rank"] == 0
    assert info["hallucinated"] == 1 and info["duplicates"] >= 1 and info["seen"] >= 2


def test_wasted_counts_lines_that_cannot_hit(make_env):
    env = make_env(reward_weights={"wasted": 2.0})
    env.reset(options={"example": 2})
    target, cat = env.episode.target, env.catalog
    history = set(env.split.history(2, 10**9).tolist())
    fresh = [
        cat.titles[i] for i in range(1, cat.num_embeddings) if i not in history and cat.titles[i] != cat.titles[target]
    ]
    seen_title = cat.titles[max(history)]
    env.step("Drama fan. " + CALL.format("drama"))
    # target, 6 fresh items, then a made-up title, a history item and a repeat: 3 of 10 lines wasted
    lines = [cat.titles[target], *fresh[:6], "Totally Invented Film 3000", seen_title, fresh[0]]
    _, r, _, _, info = env.step(answer_segment(lines))
    assert info["reward_components"]["wasted"] == pytest.approx(-0.3) and r == pytest.approx(-0.6)
    env.reset(options={"example": 2})
    env.step("Drama fan. " + CALL.format("drama"))
    _, r, _, _, info = env.step(answer_segment(lines[:9]))  # format fails: no outcome reward, wasted included
    assert info["reward_components"]["wasted"] == 0.0 and r == 0.0


def test_render_and_chat_prompt(make_env):
    env = make_env(render_mode="ansi", prompt="chat")
    obs, info = env.reset(seed=0)
    assert info["messages"][0]["content"] == obs and "User interaction history:" in obs
    env.step(CALL.format("drama"))
    text = env.render()
    assert text.startswith(obs) and "<|begin_of_item_list|>" in text
    base = make_env()
    assert base.reset(seed=0)[0].endswith("Assistant:\n<think>\n")


@pytest.mark.parametrize("variant", [{"prompt": "base"}, {"prompt": "chat"}, {"prompt": "chat", "actions": "tools"}])
def test_target_hint_names_the_targets_categories(make_env, variant):
    from deeprec_env.protocol import history_block, read_hint

    plain, hinted = make_env(**variant), make_env(target_hint=True, **variant)
    longest = max(range(1, plain.catalog.num_embeddings), key=lambda i: len(", ".join(plain.catalog.categories[i])))
    for example in range(8):
        obs, _ = plain.reset(options={"example": example})
        hint_obs, _ = hinted.reset(options={"example": example})
        assert read_hint(obs) is None and hinted.episode.target == plain.episode.target
        assert read_hint(hint_obs) == list(hinted.catalog.categories[hinted.episode.target])
        if variant.get("actions") != "tools":  # the history a scripted agent reads is the same
            assert history_block(hint_obs) == history_block(obs)
        assert hinted.observation_space.contains(hint_obs)
    # the bound holds the longest hint the catalogue can write
    bound = hinted.observation_space.max_length - plain.observation_space.max_length
    assert bound >= len(", ".join(plain.catalog.categories[longest]))


def test_bad_config():
    from deeprec_env.env import EnvConfig

    with pytest.raises(ValueError, match="stage='warmup'"):
        EnvConfig(stage="warmup")
    with pytest.raises(ValueError, match="unknown reward components"):
        EnvConfig(reward_weights={"fun": 1.0})
    with pytest.raises(ValueError, match="max_calls=0"):
        EnvConfig(max_calls=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.lists(
            st.sampled_from(
                [
                    "<|begin_of_preference|>",
                    "<|end_of_preference|>",
                    "</think>",
                    "<think>",
                    "<recommendation_list>",
                    "</recommendation_list>",
                    "<|begin_of_item_list|>",
                    "\n",
                    "1. ",
                    "drama",
                    '"',
                    "\x00",
                    "\x1b[31m",
                    "é",
                    "🎬",
                ]
            ),
            max_size=40,
        ).map("".join),
    )
)
def test_fuzz_step_never_raises(make_env, text):
    env = make_env()
    env.reset(seed=0)
    done = False
    for _ in range(3):
        if done:
            break
        obs, r, term, trunc, info = env.step(text)
        assert isinstance(obs, str) and np.isfinite(r)
        assert set(info["reward_components"]) == set(COMPONENTS)
        done = term or trunc


def test_fuzz_extremes(make_env):
    env = make_env()
    for text in [
        "",
        "x" * 5_000_000,
        CALL.format("x") * 100,
        "<|begin_of_preference|>" * 10_000,
        CALL.format("   "),
        CALL.format('"  "'),
    ]:
        env.reset(seed=0)
        t = time.perf_counter()
        _, r, term, trunc, info = env.step(text)
        assert time.perf_counter() - t < 2.0
        assert term and not info["is_action_valid"]
    env.reset(seed=0)
    for bad in (None, 3, b"bytes", ["list"]):
        with pytest.raises(TypeError, match="action must be str"):
            env.step(bad)


def test_gym_make_registered_ids(env_kwargs, resources):
    env = gym.make("DeepRec-v0", resources=resources, **env_kwargs)
    assert env.unwrapped.config.stage == "rec"
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space
    cold = gym.make("DeepRecColdStart-v0", resources=resources, **env_kwargs)
    assert cold.unwrapped.config.stage == "coldstart"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from(
            [
                CALL.format("drama"),
                "Assistant " + CALL.format("x"),
                "<think> " + CALL.format("y"),
                "[retrieved item " + CALL.format("z"),
            ]
        ),
        min_size=1,
        max_size=4,
    )
)
def test_incremental_counts_match_full_text(make_env, segments):
    env = make_env()
    env.reset(seed=0)
    for seg in segments:
        env.step(seg)
    ep = env.episode
    for pat in ep.patterns:
        assert ep.count(pat) == ep.response.count(pat)
    for marker in ("</think>", "<|end_of_item_list|>"):
        assert ep.after_last(marker) == ep.response.rpartition(marker)[2] or marker not in ep.response


def test_onnx_encoder_backend(env_kwargs, resources):
    """encoder_backend='onnx' reaches the env's encoder and retrieves what the torch backend retrieves."""
    pytest.importorskip("onnxruntime")
    from deeprec_env.embed import TextEncoder
    from deeprec_env.retrieval import Retriever

    env = gym.make("DeepRec-v0", **env_kwargs, encoder_backend="onnx")
    assert env.unwrapped.res.encoder.backend == "onnx"
    torch_r = resources.retriever
    onnx_r = Retriever(torch_r.trm, TextEncoder(env_kwargs["encoder"], backend="onnx"), index=torch_r.index)
    test = resources.dataset.split("test")
    hist = [test.history(i, torch_r.max_len) for i in range(8)]
    prefs = ["drama", "light comedy", "", "dark thriller; old romance", "action", "sad movies", "new", "funny"]
    a_ids, a_scores = torch_r.retrieve(hist, prefs, k=10)
    b_ids, b_scores = onnx_r.retrieve(hist, prefs, k=10)
    np.testing.assert_allclose(b_scores, a_scores, atol=1e-5)
    assert np.array_equal(a_ids, b_ids)
    with pytest.raises(ValueError, match="encoder_backend='tensorrt'"):
        gym.make("DeepRec-v0", **env_kwargs, encoder_backend="tensorrt")


def test_unencodable_preference_keeps_the_episode_alive(make_env):
    env = make_env()
    env.reset(seed=0)
    obs, r, term, _, info = env.step("Odd bytes. " + CALL.format("drama \udbc2"))
    assert info["is_action_valid"] and not term and obs.startswith("<|begin_of_item_list|>")
    obs, r, term, _, info = env.step(CALL.format("comedy " * 300))  # longer than the encoder's positions
    assert info["is_action_valid"] and not term
    _, _, term, _, info = env.step(answer_segment(other_titles(env, env.episode.target, 10)))
    assert term and info["format_errors"] == []


def test_resources_are_keyed_by_one_frozen_config(env_kwargs, resources):
    from deeprec_env.env import EnvConfig
    from deeprec_env.resources import ResourceConfig, get_resources

    config = EnvConfig(**env_kwargs)
    assert isinstance(config.resources, ResourceConfig)
    assert get_resources(config.resources) is get_resources(EnvConfig(**env_kwargs, stage="coldstart", split="valid"))
    with pytest.raises(TypeError, match="ResourceConfig or an EnvConfig"):
        get_resources({"dataset": "synthetic"})
