"""TRM quality under full ranking on the leave-one-out test split.

Compares popularity, SASRec and the PreferenceTRM with no, oracle and misleading preferences.

    python -m benchmarks.trm_quality                 # embedded ml-100k, ~15 min on a 2-core CPU
    python -m benchmarks.trm_quality --smoke         # tiny synthetic run (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

import numpy as np

from benchmarks.common import environment, markdown_table, protocol_text, write_results
from deeprec_env.data import load_dataset, synthetic
from deeprec_env.metrics import full_ranks, rank_metrics
from deeprec_env.trm import (
    TRMConfig,
    evaluate_ranks,
    load_or_train_trm,
    misleading_preference,
    oracle_preference,
    save_trm,
    train_trm,
    trm_cache_path,
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
    prefs = {
        "none": None,
        "oracle (target's categories)": [oracle_preference(dataset, int(i)) for i in test.targets],
        "misleading (other categories)": [misleading_preference(dataset, int(i)) for i in test.targets],
    }
    for name, p in prefs.items():
        r = evaluate_ranks(trm, dataset, "test", p, encoder, exclude_history=exclude_history)
        rows.append(
            {"model": "PreferenceTRM", "preference": name, **rank_metrics(r, KS_RECALL, KS_NDCG), "train_s": trm_s}
        )
    return {"rows": rows, "trm_train_log": log}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--path", default=None, help="file or folder for datasets other than ml-100k")
    ap.add_argument("--metadata", default=None, help="item metadata file (amazon)")
    ap.add_argument("--encoder", default="minilm", help="text encoder: 'minilm' (embedded), a path or a hub id")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--exclude-history", action="store_true", help="mask history items from the ranking")
    ap.add_argument("--save", default=None, help="also save the trained TRM checkpoint to this folder")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--sasrec-epochs", default="40,200", help="epoch budgets of the SASRec baselines")
    ap.add_argument("--sasrec-alt-epochs", type=int, default=100,
                    help=f"epoch budget of a SASRec with {SASREC_ALT} (0: skip it)")  # fmt: skip
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
                 sasrec_epochs=budgets, sasrec_alt=alt)  # fmt: skip
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
        f"TRM's settings unless the row says otherwise; PreferenceTRM = {config}",
        "text encoder": args.encoder,
        "seed": args.seed,
        "early stopping": "best validation NDCG@10 (no preference)",
    }
    table = markdown_table(result["rows"], COLUMNS)
    text = f"## TRM quality\n\n{table}\n\nProtocol:\n{protocol_text(protocol)}\n"
    print(text)
    payload = {"benchmark": "trm_quality", "protocol": protocol, "config": asdict(config), **environment(), **result}
    if not args.smoke or args.out:
        js, md = write_results("trm_quality" + ("_smoke" if args.smoke else ""), payload, text, args.out)
        print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
