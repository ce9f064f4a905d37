"""PPO from stable-baselines3 on the numeric view (``DeepRecNumeric-v0``), evaluated like every agent.

    python -m agents.sb3 --timesteps 20000 --out runs/sb3-ppo.zip    # train and save
    python -m agents.evaluate --agents sb3-ppo --sb3-model runs/sb3-ppo.zip

The saved policy acts in the text harness through :class:`SB3Policy`, which builds the same numeric
observation from the text episode and writes the chosen facet call or the final answer as text.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agents.base import Policy
from deeprec_env.config import check_fields, torch_device


def _require_sb3():
    if importlib.util.find_spec("stable_baselines3") is None:
        raise ImportError('the PPO agent needs stable-baselines3: pip install "deeprec-env"')
    import stable_baselines3

    return stable_baselines3


@dataclass(frozen=True)
class PPOArgs:
    """Settings of a PPO run on the numeric view."""

    timesteps: int = 20_000
    """Environment steps to train for."""
    n_facets: int = 16
    """Facets offered as actions."""
    split: Literal["train", "valid", "test"] = "test"
    """Split the agent trains on (with ``user_group``: the RL group's test targets, as the LLM trainers)."""
    user_group: Literal["all", "rl", "eval"] = "rl"
    """User group the agent trains on (evaluate it on ``eval``: users it never saw)."""
    dataset: str = "ml-100k"
    """Dataset name."""
    n_steps: int = 256
    """PPO rollout length."""
    batch_size: int = 64
    """PPO minibatch size."""
    lr: float = 3e-4
    """Adam learning rate."""
    seed: int = 0
    """Seed of PPO and of the environment."""
    device: str = "cpu"
    """Torch device of the PPO networks (or stable-baselines3's ``"auto"``: a GPU if there is one)."""
    out: str = "runs/sb3-ppo.zip"
    """Where the trained model is saved."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name, low in (("timesteps", 1), ("n_facets", 1), ("n_steps", 2), ("batch_size", 2)):  # SB3 needs 2
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= {low}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}; must be > 0")


def train_ppo(args: PPOArgs, env_kwargs: dict | None = None):
    """Train PPO on ``DeepRecNumeric-v0`` and save it to ``args.out``; returns the model."""
    import gymnasium as gym

    import deeprec_env  # noqa: F401

    sb3 = _require_sb3()
    if args.device != "auto":  # stable-baselines3 would run on the CPU when asked for a GPU it cannot find
        torch_device(args.device, "PPOArgs.device")
    kwargs = {"dataset": args.dataset, "split": args.split, "user_group": args.user_group, "n_facets": args.n_facets,
              **(env_kwargs or {})}  # fmt: skip
    env = gym.wrappers.RecordEpisodeStatistics(gym.make("DeepRecNumeric-v0", **kwargs), buffer_length=10**7)
    env.reset(seed=args.seed)
    model = sb3.PPO(
        "MlpPolicy", env, n_steps=args.n_steps, batch_size=args.batch_size, learning_rate=args.lr,
        seed=args.seed, device=args.device, verbose=0,
    )  # fmt: skip
    model.learn(total_timesteps=args.timesteps, progress_bar=False)
    model.save(args.out)
    model.episode_returns = [float(r) for r in env.return_queue]  # the training curve, episode by episode
    return model


def learning_curve(returns: list[float], parts: int = 5) -> list[float]:
    """Mean episode return over ``parts`` consecutive equal slices of training (first to last).

    >>> learning_curve([0.0, 1.0, 2.0, 3.0], parts=2)
    [0.5, 2.5]
    """
    chunks = np.array_split(np.asarray(returns, dtype=np.float64), parts)
    return [round(float(c.mean()), 4) if len(c) else float("nan") for c in chunks]


class SB3Policy(Policy):
    """A saved PPO model acting in the text harness through the numeric view of each episode."""

    name = "sb3-ppo"

    def __init__(self, path: str, n_facets: int = 16) -> None:
        sb3 = _require_sb3()
        self.model = sb3.PPO.load(path, device="cpu")
        self.n_facets = n_facets

    def start(self, env, obs, info):
        """Attach a numeric view to the text episode."""
        from deeprec_env.wrappers import DeepRecNumericEnv

        return {"env": env, "view": DeepRecNumericEnv(n_facets=self.n_facets, text_env=env)}

    def act(self, state, obs: str) -> str:
        """PPO's action on the numeric observation, written as a protocol segment."""
        view = state["view"]
        action, _ = self.model.predict(view.observe(), deterministic=True)
        return view.action_text(int(np.asarray(action).item()))


def main(argv=None) -> None:
    """Train and save (CLI built from :class:`PPOArgs`)."""
    from deeprec_env.cli import add_dataclass_args, from_args, require_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(ap, PPOArgs)
    args = from_args(PPOArgs, ap.parse_args(argv), parser=ap)
    if args.device != "auto":
        require_device(ap, args.device)
    train_ppo(args)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
