"""DeepRec over OpenEnv's server API: ``deeprec serve``, and a client (``pip install 'deeprec-env[openenv]'``).

OpenEnv (openenv-core) is the environment protocol that TRL, SkyRL, torchrl, Unsloth and NeMo Gym read.
The server is openenv-core's own FastAPI app (``create_fastapi_app``) around :class:`DeepRecServerEnv`:

- WebSocket ``/ws``: one session per connection, each with its own episode (a GRPO group opens G of
  them at once; ``--max-sessions`` caps them). Messages ``reset`` (``seed``, ``user``, ``example``,
  ``stage``), ``step`` (``{"text": segment}``), ``state``, ``close``. A bad message (unknown user, a
  step before reset or after the end, a non-string action) gets an error reply with the reason and the
  session stays usable.
- HTTP ``/reset``, ``/step``, ``/state``, ``/schema``, ``/health``, ``/docs``: OpenEnv's stateless
  endpoints (a fresh environment per request: useful to look, not to play); a bad request is a 4xx
  with a message, never a dead server.

Every session shares one process's dataset, TRM and index (``deeprec_env.resources``); environment
work is serialised by a lock (it takes well under a millisecond a step, the network more). The
observation carries the text, the step's reward, ``done`` and the env's ``info`` as JSON
(``info["episode_reward_components"]``, ``info["metrics"]`` at the end).

    deeprec serve --port 8000 --stage rec                 # then, from any process:
    from deeprec_env.openenv_server import DeepRecClient, DeepRecAction
    with DeepRecClient(base_url="http://localhost:8000").sync() as env:
        result = env.reset(user=3)
        result = env.step(DeepRecAction(text="... <|begin_of_preference|> comedy <|end_of_preference|>"))
"""

from __future__ import annotations

import threading
from typing import Any

try:
    from openenv.core.client_types import StepResult
    from openenv.core.env_client import EnvClient
    from openenv.core.env_server import Action, Environment, Observation, State, create_fastapi_app
except ImportError as err:  # pragma: no cover - the extra is installed in CI
    raise ImportError(
        "the OpenEnv server needs openenv-core: pip install 'deeprec-env[openenv]' "
        "(or openenv-core --no-deps plus fastapi, uvicorn, websockets, fastmcp<4)"
    ) from err
from pydantic import Field

from deeprec_env.env import DeepRecEnv, EnvConfig
from deeprec_env.resources import get_resources
from deeprec_env.storage import jsonable

RESET_OPTIONS = ("user", "example", "stage")
"""Reset keywords besides OpenEnv's ``seed`` and ``episode_id``."""


class DeepRecAction(Action):
    """One policy segment: reasoning and a preference call, or reasoning and the final answer."""

    text: str = Field(description="the generated segment (any string; a malformed one is penalised, not rejected)")


class DeepRecObservation(Observation):
    """What the environment returns: the text to append (prompt, item list or feedback) and the step's info."""

    text: str = Field(default="", description="the prompt after reset; the inserted item list after a call")
    info: dict[str, Any] = Field(default_factory=dict, description="the environment's info dict, as JSON")


class DeepRecState(State):
    """The session's episode: user, stage, calls so far, whether it ended."""

    user: int | None = None
    stage: str | None = None
    split: str | None = None
    n_calls: int = 0
    done: bool = False
    episode_return: float = 0.0


_LOCK = threading.Lock()  # the shared retriever's caches and torch's thread setting are process-wide


class DeepRecServerEnv(Environment):
    """One OpenEnv session: DeepRec text environments (one per stage, built on demand) on shared resources.

    Args:
        **env_kwargs: :class:`~deeprec_env.env.EnvConfig` fields every session starts from (the server's
            command-line options); ``reset(stage=...)`` switches a session's stage.
    """

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self, **env_kwargs: Any) -> None:
        super().__init__()
        self.env_kwargs = dict(env_kwargs)
        self.config = EnvConfig(**self.env_kwargs)
        self._envs: dict[str, DeepRecEnv] = {}
        self._env: DeepRecEnv | None = None
        self._state = DeepRecState()

    def _stage_env(self, stage: str) -> DeepRecEnv:
        if stage not in self._envs:
            kwargs = {**self.env_kwargs, "stage": stage}
            self._envs[stage] = DeepRecEnv(resources=get_resources(EnvConfig(**kwargs)), **kwargs)
        return self._envs[stage]

    def reset(
        self,
        seed: int | None = None,
        episode_id: str | None = None,
        user: int | None = None,
        example: int | None = None,
        stage: str | None = None,
        **kwargs: Any,
    ) -> DeepRecObservation:
        """Start an episode: a random one of the split (``seed``), or ``user`` / ``example``, in ``stage``."""
        if kwargs:
            known = ", ".join(("seed", "episode_id", *RESET_OPTIONS))
            raise ValueError(f"unknown reset options {sorted(kwargs)}; use {known}")
        stage = stage if stage is not None else self.config.stage
        if stage not in ("rec", "coldstart"):
            raise ValueError(f"stage={stage!r}; must be 'rec' or 'coldstart'")
        options = {k: v for k, v in (("user", user), ("example", example)) if v is not None}
        with _LOCK:
            env = self._stage_env(stage)
            obs, info = env.reset(seed=seed, options=options or None)
        self._env = env
        self._state = DeepRecState(
            episode_id=episode_id, step_count=0, user=info["user"], stage=stage, split=env.config.split
        )
        return DeepRecObservation(text=obs, info=jsonable(info), done=False, reward=None)

    def step(self, action: DeepRecAction, timeout_s: float | None = None, **kwargs: Any) -> DeepRecObservation:
        """Consume one segment (see ``DeepRecEnv.step``)."""
        if self._env is None:
            raise ValueError("step before reset: send a reset message first")
        if self._state.done:
            raise ValueError("the episode has ended: send a reset message to start another")
        if not isinstance(action, DeepRecAction):
            raise ValueError(f"action must be a DeepRecAction, got {type(action).__name__}")
        with _LOCK:
            obs, reward, terminated, truncated, info = self._env.step(action.text)
        done = bool(terminated or truncated)
        self._state.step_count += 1
        self._state.n_calls = int(info.get("n_calls", self._state.n_calls))
        self._state.done = done
        self._state.episode_return += float(reward)
        return DeepRecObservation(text=obs, info=jsonable(info), done=done, reward=float(reward))

    @property
    def state(self) -> DeepRecState:
        """The session's episode state."""
        return self._state


def create_app(max_sessions: int = 64, **env_kwargs: Any):
    """The FastAPI app serving DeepRec (``env_kwargs``: the sessions' default settings).

    Resources (dataset, TRM, index) are loaded once here, so the first session does not wait on them
    and a bad setting fails at start-up with its message.
    """
    from fastapi import Request
    from fastapi.responses import JSONResponse

    config = EnvConfig(**env_kwargs)
    get_resources(config)

    def factory() -> DeepRecServerEnv:
        return DeepRecServerEnv(**env_kwargs)

    app = create_fastapi_app(factory, DeepRecAction, DeepRecObservation, max_concurrent_envs=max_sessions)

    async def bad_request(request: Request, exc: Exception) -> JSONResponse:  # the stateless HTTP endpoints
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    app.add_exception_handler(ValueError, bad_request)  # what the env raises for a bad request
    app.add_exception_handler(TypeError, bad_request)
    return app


def serve(host: str = "127.0.0.1", port: int = 8000, max_sessions: int = 64, **env_kwargs: Any) -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(max_sessions=max_sessions, **env_kwargs), host=host, port=port, log_level="warning")


class DeepRecClient(EnvClient[DeepRecAction, DeepRecObservation, DeepRecState]):
    """OpenEnv client of a DeepRec server (async; ``.sync()`` gives the blocking one).

    ``reset(seed=..., user=..., example=..., stage=...)``; ``step(DeepRecAction(text=...))``; both return
    a ``StepResult`` whose ``observation`` is a :class:`DeepRecObservation`.
    """

    def _step_payload(self, action: DeepRecAction) -> dict[str, Any]:
        return action.model_dump()

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[DeepRecObservation]:
        obs = payload.get("observation", payload)
        observation = DeepRecObservation(
            text=obs.get("text", ""),
            info=obs.get("info", {}),
            done=bool(payload.get("done", obs.get("done", False))),
            reward=payload.get("reward", obs.get("reward")),
        )
        return StepResult(observation=observation, reward=observation.reward, done=observation.done)

    def _parse_state(self, payload: dict[str, Any]) -> DeepRecState:
        return DeepRecState(**payload)
