import json

import numpy as np
import pytest

from agents.base import Policy, run_episodes
from agents.baselines import BASELINES, HistoryFacetPolicy
from agents.evaluate import EvalArgs, episode_options, evaluate_agent, make_policy, run, summarize
from deeprec_env.env import DeepRecEnv
from deeprec_env.metrics import ndcg_at_k, recall_at_k
from deeprec_env.trm import evaluate_ranks


@pytest.fixture
def options(resources):
    return episode_options(len(resources.dataset.split("test")), None, seed=0)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_are_well_formed(name, env_kwargs, resources, options):
    policy = BASELINES[name]()
    records = evaluate_agent(policy, env_kwargs, options[:20], batch_size=7, progress=False)
    assert len(records) == 20
    assert all(r.format_errors == [] for r in records), records[0].format_errors
    assert all(len(r.answer_ids) == 10 and r.hallucinated == 0 for r in records)


def test_trm_only_reproduces_the_trm(env_kwargs, resources, options):
    records = evaluate_agent(BASELINES["trm-only"](), env_kwargs, options, batch_size=16, progress=False)
    ranks = evaluate_ranks(resources.retriever.trm, resources.dataset, "test")
    order = [o["example"] for o in options]
    agent = np.array([r.rank for r in records])
    trm = np.where(ranks[order] < 10, ranks[order], -1)
    assert np.array_equal(agent, trm)
    # its one call retrieved the TRM's top retrieval_k, and its answer is that list's first ten
    k = DeepRecEnv(resources=resources, **env_kwargs).config.retrieval_k
    assert k > 10 and [r.retrieved_rank for r in records] == np.where(ranks[order] < k, ranks[order], -1).tolist()
    assert all(r.from_retrieved == 10 for r in records)
    assert summarize(records)["ndcg@10"] == pytest.approx(ndcg_at_k(ranks, 10))
    assert summarize(records)["recall@10"] == pytest.approx(recall_at_k(ranks, 10))


def test_oracle_is_labelled_and_beats_random(env_kwargs, resources, options):
    rand = summarize(evaluate_agent(BASELINES["random"](), env_kwargs, options, batch_size=16, progress=False))
    oracle_policy = BASELINES["oracle-preference"]()
    oracle = summarize(evaluate_agent(oracle_policy, env_kwargs, options, batch_size=16, progress=False))
    assert oracle_policy.privileged and not BASELINES["history-describer"].privileged
    assert oracle["ndcg@10"] > rand["ndcg@10"]


def test_unseen_agents_skip_the_prompts_history(env_kwargs, resources, options):
    from agents.baselines import seen_titles

    for name in ("trm-only-unseen", "history-top-category-unseen", "history-describer"):
        records = evaluate_agent(BASELINES[name](), env_kwargs, options[:30], batch_size=10, progress=False)
        env = DeepRecEnv(resources=resources, **env_kwargs)
        for o, r in zip(options[:30], records, strict=True):
            prompt, _ = env.reset(options=o)
            seen = {env.catalog.titles[i] for i in env.episode.history}
            assert seen == seen_titles(prompt)
            answered = [env.catalog.titles[i] for i in r.answer_ids]
            fresh = [t for t in answered if t not in seen]
            assert answered[: len(fresh)] == fresh  # unseen titles first; seen ones only to fill 10 lines
    trm = evaluate_agent(BASELINES["trm-only-unseen"](), env_kwargs, options[:30], batch_size=10, progress=False)
    assert all(r.calls == 1 for r in trm)


def test_history_describer_writes_its_preferences_from_the_prompt(env_kwargs, resources):
    from agents.baselines import HistoryDescriberPolicy

    env = DeepRecEnv(resources=resources, allow_empty_preference=True, **env_kwargs)
    policy = HistoryDescriberPolicy()
    obs, info = env.reset(options={"example": 0})
    state = policy.start(env, obs, info)
    last = env.catalog.titles[int(env.episode.history[-1])]
    assert state["prefs"][0] == "" and f"like {last}" in state["prefs"]
    while True:
        obs, _, term, trunc, info = env.step(policy.act(state, obs))
        if term or trunc:
            break
    assert info["format_errors"] == [] and env.episode.preferences == state["prefs"]


def test_history_facet_calls_several_times(env_kwargs, resources, options):
    records = evaluate_agent(HistoryFacetPolicy(n_calls=2), env_kwargs, options[:5], progress=False)
    assert all(r.calls == 2 for r in records)
    with pytest.raises(ValueError, match="n_calls=0"):
        HistoryFacetPolicy(n_calls=0)


def test_hint_mix_copies_the_hint_in_its_share(env_kwargs, resources, options):
    from agents.baselines import HintMixPolicy
    from deeprec_env.protocol import copies_hint

    hinted = {**env_kwargs, "target_hint": True}
    cats = resources.dataset.catalog.categories

    def copied(share):
        records = evaluate_agent(HintMixPolicy(share=share), hinted, options[:24], batch_size=8, progress=False)
        assert all(r.format_errors == [] and r.calls == 1 for r in records)
        return [copies_hint(r.preferences[0], cats[r.target]) for r in records]

    assert all(copied(1.0))
    assert sum(copied(0.5)) not in (0, 24)  # drawn per episode
    top = evaluate_agent(BASELINES["history-top-category-unseen"](), hinted, options[:24], progress=False)
    never = evaluate_agent(HintMixPolicy(share=0.0), hinted, options[:24], progress=False)
    assert [r.preferences for r in never] == [r.preferences for r in top]  # otherwise its teacher's call
    assert [r.answer_ids for r in never] == [r.answer_ids for r in top]
    with pytest.raises(ValueError, match="needs the env's target_hint=True"):
        evaluate_agent(HintMixPolicy(share=1.0), env_kwargs, options[:2], progress=False)
    with pytest.raises(ValueError, match="share=1.5"):
        HintMixPolicy(share=1.5)
    args = EvalArgs(agents="trm-only", dataset="synthetic", users=2)
    with pytest.raises(ValueError, match="never an evaluation setting"):  # the harness refuses the privileged prompt
        run(args, env_kwargs={k: v for k, v in hinted.items() if k != "dataset"}, progress=False)


def test_unseen_mix_skips_the_shown_titles_in_its_share(env_kwargs, resources, options):
    from agents.baselines import UnseenMixPolicy

    def play(policy):
        return evaluate_agent(policy, env_kwargs, options[:24], batch_size=8, progress=False)

    copy, skip = play(BASELINES["history-top-category"]()), play(BASELINES["history-top-category-unseen"]())
    assert [r.answer_ids for r in play(UnseenMixPolicy(share=0.0))] == [r.answer_ids for r in copy]
    assert [r.answer_ids for r in play(UnseenMixPolicy(share=1.0))] == [r.answer_ids for r in skip]
    mixed = play(UnseenMixPolicy(share=0.5))
    assert [r.preferences for r in mixed] == [r.preferences for r in copy]  # the same call every time
    assert all(m.answer_ids in (c.answer_ids, s.answer_ids) for m, c, s in zip(mixed, copy, skip, strict=True))
    differ = [i for i in range(24) if copy[i].answer_ids != skip[i].answer_ids]
    assert len(differ) >= 4  # the retrieved lists hold titles the prompt shows
    assert 0 < sum(mixed[i].answer_ids == skip[i].answer_ids for i in differ) < len(differ)  # drawn per episode
    # ``shown`` counts the answer lines the prompt's history shows: the copy lists them, the skipping agent not
    assert sum(r.shown for r in copy) > 0 and all(s.shown <= c.shown for c, s in zip(copy, skip, strict=True))
    assert all(r.shown <= r.seen for r in copy)  # the prompt shows part of the whole history
    with pytest.raises(ValueError, match="share=-1"):
        UnseenMixPolicy(share=-1)


def test_run_episodes_ends_stuck_policies(make_env):
    class Chatty(Policy):
        name = "chatty"

        def act(self, state, obs):
            return state["env"].config.protocol.call_open + " more " + state["env"].config.protocol.call_close

    records = run_episodes(Chatty(), [make_env(max_calls=2)], [{"example": 0}])
    assert records[0].format_errors and records[0].rank == -1


def test_evaluate_run_writes_files(env_kwargs, resources, tmp_path):
    args = EvalArgs(agents="popularity,trm-only", dataset="synthetic", users=12, batch_size=5, out=str(tmp_path))
    result = run(args, env_kwargs={k: v for k, v in env_kwargs.items() if k != "dataset"}, progress=False)
    assert [s["agent"] for s in result["summaries"]] == ["popularity", "trm-only"]
    lines = (tmp_path / "trm-only.jsonl").read_text().splitlines()
    assert len(lines) == 12 and "metrics" in json.loads(lines[0])
    protocol = json.loads((tmp_path / "summary.json").read_text())["protocol"]
    assert "ranking" in protocol
    from deeprec_env.trm import weights_digest

    assert protocol["trm"].startswith(f"weights {weights_digest(resources.retriever.trm)} ")  # which TRM it was
    with pytest.raises(ValueError, match="unknown agent 'nope'"):
        make_policy("nope", args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"agents": "nope,trm-only"}, r"agents='nope,trm-only': unknown \['nope'\]; known: random, "),
        ({"agents": " , "}, "no agent"),
        ({"agents": "sb3-ppo"}, "agent sb3-ppo needs sb3_model"),
        ({"users": 0}, r"users=0; must be >= 1 \(None: every user"),  # not "every user", as 0 read before
        ({"llm_users": 0}, "llm_users=0"),
        ({"batch_size": 0}, "batch_size=0"),  # was range()'s "arg 3 must not be zero" inside the run
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"split": "Test"}, "EvalArgs.split='Test'"),
        ({"user_group": "train"}, "EvalArgs.user_group='train'"),
        ({"llm_users": 2.5}, "EvalArgs.llm_users=2.5"),
    ],
)
def test_eval_args_refuse_bad_settings_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EvalArgs(**kwargs)


def test_sb3_ppo_trains_saves_and_evaluates(env_kwargs, resources, tmp_path, options):
    from agents.sb3 import PPOArgs, SB3Policy, train_ppo

    out = str(tmp_path / "ppo.zip")
    args = PPOArgs(timesteps=64, n_steps=32, batch_size=16, out=out, n_facets=4)
    train_ppo(args, env_kwargs={k: v for k, v in env_kwargs.items()})
    policy = SB3Policy(out, n_facets=4)
    records = evaluate_agent(policy, env_kwargs, options[:6], batch_size=3, progress=False)
    assert len(records) == 6 and all(np.isfinite(r.reward) for r in records)
