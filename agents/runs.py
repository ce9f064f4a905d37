"""What a training run leaves behind, shared by the RL stages and the warm start.

Checkpoints (:func:`save_checkpoint`, :func:`recover_checkpoint`), the run's log (:func:`read_log`,
:func:`write_log`, :func:`memory_gib`), greedy validation on fixed users (:func:`validate`) and the curves
(:func:`plot_curves`).
A log line is committed inside its step's checkpoint (``trainer_state.json["log"]``), so a killed run loses
at most the step in flight (``docs/design.md``, "Bad input, caches and kills").
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from deeprec_env.storage import atomic_write


class RunFolderError(ValueError):
    """A run folder holds a run that the settings asked for cannot continue (other settings, or past its steps)."""


@contextmanager
def run_folder_errors():
    """For the training CLIs: a :class:`RunFolderError` ends the command with its one-line message, no traceback."""
    try:
        yield
    except RunFolderError as e:
        raise SystemExit(f"error: {e}") from None


def _deepspeed(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type.name == "DEEPSPEED"


def _sharded(accelerator) -> bool:
    """True when the engine shards weights or optimizer state (DeepSpeed, FSDP)."""
    return accelerator is not None and accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")


def save_checkpoint(path: Path, model, tokenizer, optimizer, step: int, args, accelerator=None,
                    extra: dict | None = None) -> None:  # fmt: skip
    """Model, tokenizer, optimizer state and step, written to a temporary folder then renamed.

    Under ``accelerate`` every process calls this: sharded engines (DeepSpeed, FSDP) gather the
    weights and save their optimizer shards (``engine/``, via ``accelerator.save_state``); the main
    process writes the rest. A LoRA model saves its adapter only (``load_causal_lm`` reloads it).
    ``extra`` is added to ``trainer_state.json`` (inside the same atomic rename).
    """
    main = accelerator is None or accelerator.is_main_process
    sharded = _sharded(accelerator)
    tmp = path.parent / f".{path.name}.tmp"
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    try:
        state = accelerator.get_state_dict(model) if sharded else None  # collective
        if sharded:
            accelerator.save_state(str(tmp / "engine"))  # collective
        if main:
            unwrapped = model if accelerator is None else accelerator.unwrap_model(model)
            kwargs = {"state_dict": state} if sharded else {}
            if hasattr(unwrapped, "peft_config"):  # the adapter only; peft would look the base up on the hub
                kwargs["save_embedding_layers"] = False
                kwargs["selected_adapters"] = [unwrapped.active_adapter]  # not a KL reference's frozen copy
            unwrapped.save_pretrained(tmp, **kwargs)
            tokenizer.save_pretrained(tmp)
            if not sharded:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            trainer_state = {"step": step, "args": asdict(args), **(extra or {})}
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator is not None:
        accelerator.wait_for_everyone()


def recover_checkpoint(path: Path) -> None:
    """Finish or undo a checkpoint replacement that a kill interrupted (see :func:`save_checkpoint`).

    The previous checkpoint is renamed aside before the new one takes its name; a kill between the two
    renames leaves only the aside copy, which is put back (the step in flight is lost, nothing else).
    """
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and (old / "trainer_state.json").is_file():
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(path.with_name(f".{path.name}.tmp"), ignore_errors=True)


def memory_gib() -> dict[str, float | None]:
    """This process's resident memory now (``rss_gib``) and its peak since it started (``peak_rss_gib``), in GiB.

    For the log line of a step: a long CPU run's memory can grow from step to step (``docs/training.md``). None
    where the platform does not tell (``/proc`` is Linux's; ``resource`` is missing on Windows).
    """
    out: dict[str, float | None] = {"rss_gib": None, "peak_rss_gib": None}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_gib"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["peak_rss_gib"] = peak / 2**30 if sys.platform == "darwin" else peak / 2**20
    except ImportError:
        pass
    return out


def read_log(path: Path, before: int | None = None) -> list[dict]:
    """The JSON lines of a run's log (a torn last line, from a kill mid-write, is dropped).

    ``before``: keep the steps below it only.
    """
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if before is None or row.get("step", 0) < before:
                rows.append(row)
    return rows


def write_log(path: Path, rows: list[dict]) -> None:
    """Write a run's log as JSON lines, atomically (a reader never sees a torn line)."""
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def validation_records(policy, env_kwargs: dict, n_users: int, resources=None, batch_size: int = 8) -> list:
    """Greedy episodes of ``policy`` on a fixed subset of the validation episodes, as ``EpisodeRecord``s.

    The episodes are ``rollout.VALIDATION_EPISODES``; the subset is the first ``n_users`` of a seeded order,
    the same for every call.
    """
    from agents.evaluate import episode_options, evaluate_agent
    from agents.rollout import VALIDATION_EPISODES
    from deeprec_env.env import EnvConfig, episode_split, get_resources

    kwargs = {**env_kwargs, **VALIDATION_EPISODES}
    config = EnvConfig(**kwargs)
    resources = resources or get_resources(config)
    n = len(episode_split(config, resources.dataset))
    if not 1 <= n_users <= n:
        raise ValueError(f"{n_users} validation users asked; the validation episodes have 1 to {n}")
    saved = getattr(policy, "temperature", None)  # scripted agents have none
    if saved is not None:
        policy.temperature = 0.0
    try:
        return evaluate_agent(policy, kwargs, episode_options(n, n_users, 0), batch_size=min(batch_size, n_users),
                              progress=False, resources=resources)  # fmt: skip
    finally:
        if saved is not None:
            policy.temperature = saved


def validate(policy, env_kwargs: dict, n_users: int, resources=None) -> dict:
    """Greedy Recall/NDCG, format failures and calls on :func:`validation_records`, as ``val_*`` log fields."""
    from agents.evaluate import summarize

    s = summarize(validation_records(policy, env_kwargs, n_users, resources))
    return {f"val_{k}": s[k] for k in ("recall@10", "ndcg@10", "format_fail", "calls")}


def run_state(out: Path, args=None, free: frozenset[str] = frozenset()) -> tuple[int, list[dict], Path | None]:
    """Where a run in ``out`` stands: ``(next step, log of completed steps, checkpoint to resume from)``.

    Call :func:`recover_checkpoint` first (on one process). The log comes from the checkpoint (or, for a
    run written before logs travelled with checkpoints, from ``log.jsonl``'s lines below that step).
    Given the run's ``args`` (a dataclass), a checkpoint written with other settings is a
    :class:`RunFolderError` naming them, except for the fields in ``free`` (those that may change between
    a run's sessions); settings one side lacks (a field added or removed since) are not compared.
    """
    ckpt = out / "checkpoint"
    state_file = ckpt / "trainer_state.json"
    if not state_file.is_file():
        return 0, [], None
    state = json.loads(state_file.read_text())
    if args is not None:
        _check_same_settings(out, state.get("args", {}), args, free)
    return state["step"], state.get("log", read_log(out / "log.jsonl", before=state["step"])), ckpt


def _check_same_settings(out: Path, saved: dict, args, free: frozenset[str]) -> None:
    now = json.loads(json.dumps(asdict(args)))  # tuples as the saved lists
    changed = [k for k in now if k in saved and k not in free and saved[k] != now[k]]
    if changed:
        said = ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in changed)
        raise RunFolderError(
            f"{out} holds a run started with {said}; a run continues only with the settings it started with "
            f"(free to change: {', '.join(sorted(free)) or 'none'}): give the same settings, or another out folder"
        )


def plot_curves(log_path: Path, png: Path) -> None:
    """Reward, calls and format-failure curves of a run (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(Path(log_path))
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    stages = list(dict.fromkeys(r.get("stage", "") for r in rows))
    for ax, key in zip(axes, ("reward", "calls", "format_fail"), strict=True):
        for stage in stages:  # one line per stage: the stages' rewards are on different scales
            part = [r for r in rows if r.get("stage", "") == stage]
            ax.plot([r["step"] for r in part], [r[key] for r in part], marker="o", label=stage)
        ax.set_title(key)
        if len(stages) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
