"""The tool-call variant: the same episodes and rewards as the tag protocol; TRL's environment_factory runs it."""

import json

import gymnasium as gym
import pytest

from deeprec_env.env import DeepRecEnv
from deeprec_env.protocol import answer_text, call_text
from deeprec_env.tools import NO_CONTENT, TOOLS, DeepRecTRLEnv, parse_tool_call


def DeepRecToolEnv(**kwargs):  # noqa: N802 - the tool variant as the tests build it
    return DeepRecEnv(**{"prompt": "chat", "actions": "tools", **kwargs})


def test_tool_calls_score_as_the_equivalent_segments(make_env, env_kwargs, resources):
    tools = gym.make("DeepRecTools-v0", **env_kwargs)
    text = make_env(prompt="chat")
    p = text.config.protocol
    for user in (0, 5, 9):
        msg, info = tools.reset(options={"user": user})
        text.reset(options={"user": user})
        assert info["tools"] == TOOLS and info["messages"][0]["content"] == msg and "`recommend`" in msg
        _, r1, _, _, i1 = tools.step({"name": "recommend", "arguments": {"preference": "drama"}, "content": "Hm."})
        _, s1, _, _, j1 = text.step(call_text("drama", p, "Hm."))
        assert (r1, i1["retrieved"]) == (s1, j1["retrieved"])
        titles = [text.catalog.titles[i] for i in j1["retrieved"][:10]]
        call = {"function": {"name": "answer", "arguments": json.dumps({"items": titles})}}  # OpenAI nesting
        _, r2, term, _, i2 = tools.step(json.dumps(call))
        _, s2, _, _, j2 = text.step(answer_text(titles, p, NO_CONTENT))  # a call without text
        assert term and r2 == s2 and i2["metrics"] == j2["metrics"] and i2["format_errors"] == []


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "a dict"),
        ({"arguments": {}}, "needs a 'name'"),
        ({"name": "search", "arguments": {}}, "unknown tool 'search'"),
        ({"name": "recommend", "arguments": {"preference": 3}}, "one argument, 'preference'"),
        ({"name": "recommend", "arguments": {"preference": "a", "k": 5}}, "one argument"),
        ({"name": "answer", "arguments": {"items": "A; B"}}, "list of title strings"),
        ({"name": "answer", "arguments": "{broken"}, "not a JSON object"),
    ],
)
def test_malformed_calls_are_penalised_not_raised(env_kwargs, resources, bad, reason):
    with pytest.raises(ValueError, match=reason):
        parse_tool_call(bad)
    env = DeepRecToolEnv(**env_kwargs)
    env.reset(seed=0)
    _, reward, term, _, info = env.step(bad)
    assert reason.split("'")[0] in info["tool_error"] and reward < 0 and term


def test_bad_types_raise_and_prompt_must_be_chat(env_kwargs, resources):
    env = DeepRecToolEnv(**env_kwargs)
    env.reset(seed=0)
    with pytest.raises(TypeError, match="tool call"):
        env.step(None)
    with pytest.raises(ValueError, match="needs prompt='chat'"):
        DeepRecToolEnv(**{**env_kwargs, "prompt": "base"})


def test_trl_class_plays_an_episode_and_owns_the_reward(env_kwargs, resources, make_env):
    env = DeepRecTRLEnv(**env_kwargs)
    env.reset(user=4, prompt=[{"role": "user", "content": "ignored"}])
    items = env.recommend("drama")
    assert items.startswith("<|begin_of_item_list|>")
    text = make_env(prompt="chat")
    text.reset(options={"user": 4})
    _, r1, *_, info = text.step(call_text("drama", text.config.protocol, NO_CONTENT))
    titles = [text.catalog.titles[i] for i in info["retrieved"][:10]]
    assert env.answer(titles) == "Recommendation list received."
    _, r2, *_ = text.step(answer_text(titles, text.config.protocol, NO_CONTENT))
    assert env.get_reward() == pytest.approx(r1 + r2)
    assert env.recommend("more") == "The episode has ended: no more tool calls."
    env.reset(user=4)
    assert env.get_reward() < 0  # no answer: a format failure


def test_trl_environment_factory_runs_a_step(tmp_path, env_kwargs, resources):
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_chat_template

    from agents.trl_adapter import prompt_dataset
    from deeprec_env.fixtures import build_tiny_lm
    from tests.test_trl import CPU_RUN

    folder = build_tiny_lm(tmp_path / "lm", chatml=True, chat_template=qwen3_chat_template)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    kwargs = {**env_kwargs, "prompt_history": 5}
    args = GRPOConfig(str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=32, **CPU_RUN)  # fmt: skip
    trainer = GRPOTrainer(
        model=model, args=args, processing_class=tok, train_dataset=prompt_dataset(tools=True, **kwargs),
        environment_factory=lambda: DeepRecTRLEnv(**kwargs),
    )  # fmt: skip
    trainer.train()
    logged = [x for x in trainer.state.log_history if "reward" in x]
    assert len(logged) == 1 and "rewards/DeepRecTRLEnv/mean" in logged[0], sorted(logged[0])
    assert trl.__version__


def test_vector_env_batches_tool_calls(env_kwargs, resources):
    vec = gym.make_vec("DeepRecTools-v0", num_envs=3, vectorization_mode="vector_entry_point", **env_kwargs)
    single = DeepRecToolEnv(**env_kwargs)
    users = [0, 4, 7]
    vec.reset(options={"user": users})
    calls = [{"name": "recommend", "arguments": {"preference": p}} for p in ("drama", "comedy", "action")]
    _, rewards, _, _, infos = vec.step(calls)
    for i, user in enumerate(users):
        single.reset(options={"user": user})
        _, r, _, _, info = single.step(calls[i])
        assert r == rewards[i] and info["retrieved"] == infos["retrieved"][i]
    assert "tools" in vec.unwrapped.envs[0].reset(options={"user": 0})[1]
