"""Train the TRM under a few settings and choose by validation: ``python -m benchmarks.trm_sweep``.

Each positional argument is one setting, written as ``field=value`` pairs of
:class:`~deeprec_env.trm.TRMConfig` joined by commas (``default`` = the defaults), for example::

    python -m benchmarks.trm_sweep default temperature=0.1 lr=0.005,dropout=0.2

Every setting trains from scratch with the same seed; the table lists the best validation NDCG (the
early-stopping criterion, full ranking, no preference), validation NDCG@10, the test no-preference
NDCG@10 and Recall@20, training time and epochs. Settings are ranked by validation: the test columns are
reported, never used to choose. Results go to ``benchmarks/results/trm_sweep.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from benchmarks.common import markdown_table, publish
from deeprec_env.cli import add_dataclass_args
from deeprec_env.data import load_dataset, synthetic
from deeprec_env.metrics import ndcg_at_k, recall_at_k
from deeprec_env.trm import TRMConfig, evaluate_ranks, train_trm


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(message)


def parse_setting(text: str) -> dict:
    """``"lr=0.005,dropout=0.2"`` -> ``{"lr": 0.005, "dropout": 0.2}``, typed as ``deeprec trm-train`` types them.

    The values go through the options :func:`deeprec_env.cli.add_dataclass_args` makes for :class:`TRMConfig`
    (the CLI's parsing, one set of rules); a bad field or value raises ``ValueError``.
    """
    if text == "default":
        return {}
    parser = _RaisingParser(add_help=False)
    add_dataclass_args(parser, TRMConfig)
    argv, keys = [], []
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r}: expected field=value with a TRMConfig field")
        keys.append(key.strip().replace("-", "_"))
        argv += ["--" + keys[-1].replace("_", "-"), value]
    ns = parser.parse_args(argv)
    return {k: getattr(ns, k) for k in keys}


def configs(settings: Sequence[str], base: TRMConfig) -> list[tuple[str, TRMConfig]]:
    """Each setting with its validated config (``base`` changed by the setting's fields): bad ones fail here."""
    return [(text, dataclasses.replace(base, **parse_setting(text))) for text in settings]


def run(dataset, settings: Sequence[tuple[str, TRMConfig]], encoder=None, progress: bool = True) -> list[dict]:
    """Train one TRM per ``(setting, config)``; rows sorted by best validation NDCG (the early-stopping criterion)."""
    rows = []
    for text, config in settings:
        model, log = train_trm(dataset, config, encoder, progress=progress)
        test = evaluate_ranks(model, dataset, "test")
        rows.append({
            "setting": text,
            "valid ndcg (criterion)": log["best_valid_ndcg"],
            "valid ndcg@10": log["best_valid_ndcg10"],
            "test ndcg@10": ndcg_at_k(test, 10),
            "test recall@20": recall_at_k(test, 20),
            "train_s": log["seconds"],
            "epochs": log["epochs_run"],
        })  # fmt: skip
    return sorted(rows, key=lambda r: -r["valid ndcg (criterion)"])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="field=value[,field=value] of TRMConfig, or 'default'")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic data, tiny model, seconds")
    args = ap.parse_args(argv)

    from deeprec_env.embed import TextEncoder

    base = TRMConfig(seed=args.seed)
    if args.smoke:
        base = dataclasses.replace(base, d_model=16, ffn_dim=32, max_len=12, max_epochs=2, batch_size=32)
    try:
        settings = configs(args.settings, base)  # bad settings fail before anything loads or trains
    except ValueError as e:
        ap.error(str(e))
    dataset = synthetic(80, 40, seed=args.seed) if args.smoke else load_dataset(args.dataset)
    rows = run(dataset, settings, TextEncoder(args.encoder), progress=not args.smoke)
    protocol = {
        "dataset": f"{dataset.name} ({dataset.n_users} users, {dataset.n_items} items)",
        "split": "leave-one-out by time; valid = second last item, test = last item (all users)",
        "ranking": "full ranking over the whole catalogue, no preference, history items not masked",
        "choice": "settings ranked by the best validation NDCG (full ranking), the early-stopping criterion; "
        "test columns are reported, not used to choose",
        "base": "TRMConfig defaults, changed only by the setting's fields",
        "text encoder": args.encoder,
        "seed": args.seed,
    }
    columns = ["setting", "valid ndcg (criterion)", "valid ndcg@10", "test ndcg@10", "test recall@20", "train_s",
               "epochs"]  # fmt: skip
    publish(
        "trm_sweep", "TRM settings sweep", markdown_table(rows, columns), protocol, {"rows": rows}, args.smoke, args.out
    )


if __name__ == "__main__":
    main()
