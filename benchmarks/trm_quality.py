"""TRM quality under full ranking on the leave-one-out test split, and what its preference channel does.

Three tables: popularity, SASRec and the PreferenceTRM without a preference; the preference probe table
(``benchmarks/probes.py``: one row per kind of preference, with the share of the top 20 it steers); and
the TRM on the two user groups (the RL group, where policies train, and the evaluation group), with a
position check: a TRM that also never trains on the third-last items, scored on the third-last, second-last
and last items (why policies train on the last items of other users, ``docs/evaluation.md``).

    python -m benchmarks.trm_quality                 # embedded ml-100k, ~20 min on a 2-core CPU
    python -m benchmarks.trm_quality --smoke         # tiny synthetic run (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

import numpy as np

from benchmarks.common import environment, markdown_table, protocol_text, write_results
from benchmarks.probes import PROBE_COLUMNS, probe_table
from deeprec_env.cli import device_option
from deeprec_env.data import load_dataset, synthetic
from deeprec_env.metrics import full_ranks, rank_metrics
from deeprec_env.trm import (
    TRMConfig,
    evaluate_ranks,
    load_or_train_trm,
    save_trm,
    train_trm,
    trm_cache_path,
    weights_digest,
    weights_line,
)

KS_RECALL, KS_NDCG = (1, 5, 10, 20), (5, 10, 20)
SASREC_LONG_PATIENCE = 20
"""Early-stopping patience of SASRec runs longer than the TRM's epoch budget (trained to convergence)."""
SASREC_ALT = {"max_len": 50, "batch_size": 256, "dropout": 0.2}
"""A second SASRec setting: the common SASRec choice of a 50-item window (and this package's former TRM defaults)."""
COLUMNS = ["model", "preference", *[f"recall@{k}" for k in KS_RECALL], *[f"ndcg@{k}" for k in KS_NDCG], "train_s"]


def run(
    dataset,
    config: TRMConfig,
    encoder,
    exclude_history: bool,
    progress: bool = True,
    save_dir=None,
    sasrec_epochs: tuple[int, ...] = (40,),
    sasrec_alt: tuple[dict, int] | None = None,
    position_epochs: int = 25,
    seed: int = 0,
) -> dict:
    test = dataset.split("test")
    excl = [test.history(i, 10**9) for i in range(len(test))] if exclude_history else None
    rows = []
    pop = dataset.item_popularity.astype(np.float64)
    pop_ranks = full_ranks(np.tile(pop, (len(test), 1)), test.targets, excl)
    rows.append({"model": "popularity", "preference": "-", **rank_metrics(pop_ranks, KS_RECALL, KS_NDCG)})

    variants = [({}, epochs, "") for epochs in sasrec_epochs]
    if sasrec_alt is not None:
        alt, epochs = sasrec_alt
        variants.append((alt, epochs, ", " + ", ".join(f"{k}={v}" for k, v in alt.items())))
    for overrides, epochs, label in variants:
        sas_cfg = replace(config, use_text=False, use_preference=False, score="dot", max_epochs=epochs, **overrides)
        if epochs > config.max_epochs:
            sas_cfg = replace(sas_cfg, patience=max(config.patience, SASREC_LONG_PATIENCE))
        t = time.perf_counter()
        sas, sas_log = train_trm(dataset, sas_cfg, encoder, progress=progress)
        sas_s = time.perf_counter() - t
        r = evaluate_ranks(sas, dataset, "test", exclude_history=exclude_history)
        name = f"SASRec (ID only){label}, <= {epochs} epochs ({sas_log['epochs_run']} run)"
        rows.append({"model": name, "preference": "-", **rank_metrics(r, KS_RECALL, KS_NDCG), "train_s": sas_s})

    # the environment's TRM: trained once and cached, so the env and this table use the same model
    trm = load_or_train_trm(dataset, config, encoder, progress=progress)
    log = json.loads((trm_cache_path(dataset, config, encoder) / "config.json").read_text())["train_log"]
    trm_s = log["seconds"]
    if save_dir is not None:
        save_trm(trm, save_dir, dataset, {"train_log": log})
    r = evaluate_ranks(trm, dataset, "test", exclude_history=exclude_history)
    rows.append({"model": "PreferenceTRM", "preference": "none", **rank_metrics(r, KS_RECALL, KS_NDCG),
                 "train_s": trm_s})  # fmt: skip
    probes = probe_table(trm, dataset, encoder, "test", exclude_history)
    groups = group_rows(r, dataset, seed)
    positions = position_rows(dataset, config, encoder, position_epochs, progress) if position_epochs else []
    return {"rows": rows, "probes": probes, "groups": groups, "positions": positions, "trm_train_log": log,
            "trm_digest": weights_digest(trm)}  # fmt: skip


def _bootstrap(values_a: np.ndarray, values_b: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of mean(a) / mean(b) - 1 (users resampled within each group)."""
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(values_a), (n, len(values_a)))
    ib = rng.integers(0, len(values_b), (n, len(values_b)))
    ratio = values_a[ia].mean(1) / np.maximum(values_b[ib].mean(1), 1e-12) - 1
    return float(np.quantile(ratio, 0.025)), float(np.quantile(ratio, 0.975))


def group_rows(ranks: np.ndarray, dataset, seed: int) -> list[dict]:
    """No-preference Recall@20 / NDCG@10 of the TRM on the test targets of the RL and evaluation groups."""
    test = dataset.split("test")
    hit = ((ranks >= 0) & (ranks < 20)).astype(np.float64)
    out, parts = [], {}
    for group in ("rl", "eval"):
        ex = np.flatnonzero(np.isin(test.users, dataset.user_group(group)))
        parts[group] = hit[ex]
        out.append({"targets": f"test, {group} group", "users": len(ex), **rank_metrics(ranks[ex], (20,), (10,))})
    lo, hi = _bootstrap(parts["rl"], parts["eval"], seed)
    rel = parts["rl"].mean() / max(parts["eval"].mean(), 1e-12) - 1
    out.append({"targets": "rl vs eval, relative Recall@20", "users": "-",
                "recall@20": f"{rel:+.1%} (95% bootstrap {lo:+.1%} to {hi:+.1%})"})  # fmt: skip
    return out


def position_rows(dataset, config: TRMConfig, encoder, epochs: int, progress: bool) -> list[dict]:
    """A no-preference TRM that never trains on the last three items, scored on each of them."""
    cfg = replace(config, held_out=3, use_preference=False, max_epochs=epochs)
    model, _ = train_trm(dataset, cfg, encoder, progress=progress)
    out = []
    for split, what in (("train", "third last"), ("valid", "second last"), ("test", "last")):
        r = evaluate_ranks(model, dataset, split)
        out.append({"targets": f"{split} ({what} item)", "users": len(r), **rank_metrics(r, (20,), (10,))})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--path", default=None, help="file or folder for datasets other than ml-100k")
    ap.add_argument("--metadata", default=None, help="item metadata file (amazon)")
    ap.add_argument("--encoder", default="minilm", help="text encoder: 'minilm' (embedded), a path or a hub id")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", type=device_option, default="cpu")
    ap.add_argument("--exclude-history", action="store_true", help="mask history items from the ranking")
    ap.add_argument("--save", default=None, help="also save the trained TRM checkpoint to this folder")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--sasrec-epochs", default="40,200", help="epoch budgets of the SASRec baselines")
    ap.add_argument("--sasrec-alt-epochs", type=int, default=100,
                    help=f"epoch budget of a SASRec with {SASREC_ALT} (0: skip it)")  # fmt: skip
    ap.add_argument("--position-epochs", type=int, default=25,
                    help="epochs of the position-check TRM (0: skip the check)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic data, tiny model, seconds")
    args = ap.parse_args(argv)

    from deeprec_env.embed import TextEncoder

    encoder = TextEncoder(args.encoder, device=args.device)
    config = TRMConfig(seed=args.seed, device=args.device)
    if args.smoke:
        dataset = synthetic(80, 40, seed=args.seed)
        config = replace(config, d_model=16, ffn_dim=32, max_len=12, max_epochs=2, batch_size=32)
    else:
        dataset = load_dataset(args.dataset, args.path, metadata=args.metadata)
    budgets = (2,) if args.smoke else tuple(int(x) for x in args.sasrec_epochs.split(","))
    alt = None if args.smoke or not args.sasrec_alt_epochs else (SASREC_ALT, args.sasrec_alt_epochs)
    result = run(dataset, config, encoder, args.exclude_history, progress=not args.smoke, save_dir=args.save,
                 sasrec_epochs=budgets, sasrec_alt=alt, position_epochs=2 if args.smoke else args.position_epochs,
                 seed=args.seed)  # fmt: skip
    protocol = {
        "dataset": f"{dataset.name} ({dataset.n_users} users, {dataset.n_items} items, "
        f"{dataset.n_interactions} interactions after filtering)",
        "filtering": f"implicit feedback, iterated {dataset.config.min_user_count}-core users / "
        f"{dataset.config.min_item_count}-core items",
        "split": "leave-one-out by time (last item = test, second last = valid), ties keep file row order",
        "ranking": "full ranking over the whole catalogue, single target, ties by item id",
        "history items": "masked" if args.exclude_history else "not masked",
        "users": f"all {len(dataset.split('test'))} test users",
        "models": f"SASRec = same encoder and training code, ID only, dot product, no preference, at each "
        f"epoch budget (patience {SASREC_LONG_PATIENCE} for budgets past {config.max_epochs} epochs), with the "
        f"TRM's settings unless the row says otherwise; PreferenceTRM = the environment's default TRM "
        f"(fusion {config.fusion}, trained on every user's items before the valid target; full settings in "
        "the JSON file)",
        "text encoder": args.encoder,
        "seed": args.seed,
        "trm": weights_line(result["trm_digest"]),
        "early stopping": "best validation NDCG over the full ranking (no preference), of a moving average "
        f"of the weights (decay {config.ema})",
        "probes": "one preference per test user, as written in each row; 'vs none' = NDCG@10 over NDCG@10 "
        "without a preference on the same users; 'top10 hit changed' = users whose target enters or leaves the "
        "top 10 against no preference; the best-of row takes each user's best rank among the three honest "
        "preferences (chosen with the target: an upper bound on choosing among them); top-20 columns: mean "
        "release year, share carrying a category the probe names, share in the decade it names, each beside the "
        "same share without a preference '(none)'",
        "user groups": f"rl = {len(dataset.user_group('rl'))} users (seeded half, seed 0), eval = the other "
        f"{len(dataset.user_group('eval'))}; position check = a no-preference TRM with the same settings that "
        f"never trains on the last three items, {2 if args.smoke else args.position_epochs} epochs",
    }
    table = markdown_table(result["rows"], COLUMNS)
    probes = markdown_table(result["probes"], PROBE_COLUMNS)
    group_cols = ["targets", "users", "recall@20", "ndcg@10"]
    groups = markdown_table(result["groups"] + result["positions"], group_cols)
    text = (f"## TRM quality\n\n{table}\n\n### Preference probes (test users, no history masking)\n\n{probes}\n\n"
            f"### Where policies train and where they are evaluated (no preference)\n\n{groups}\n\n"
            f"Protocol:\n{protocol_text(protocol)}\n")  # fmt: skip
    print(text)
    payload = {"benchmark": "trm_quality", "protocol": protocol, "config": asdict(config), **environment(), **result}
    if not args.smoke or args.out:
        js, md = write_results("trm_quality" + ("_smoke" if args.smoke else ""), payload, text, args.out)
        print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
