"""deeprec-env: a Gymnasium environment for LLM-based recommendation (DeepRec, arXiv 2505.16810).

Importing the package registers ``DeepRec-v0`` (stage ``rec``), ``DeepRecColdStart-v0`` (stage
``coldstart``), ``DeepRecNumeric-v0`` (the Box/Discrete view for classic RL, stage ``rec``) and
``DeepRecTools-v0`` (the same episodes through ``recommend`` / ``answer`` tool calls, stage ``rec``).
"""

from gymnasium.envs.registration import register, registry

from deeprec_env.threads import register_fork_hook

register_fork_hook()  # forked children (AsyncVectorEnv, SubprocVecEnv) run torch/faiss single-threaded

__version__ = "0.3.0"

ENV_IDS = ("DeepRec-v0", "DeepRecColdStart-v0", "DeepRecNumeric-v0", "DeepRecTools-v0")

if "DeepRec-v0" not in registry:
    register(
        id="DeepRec-v0",
        entry_point="deeprec_env.env:DeepRecEnv",
        vector_entry_point="deeprec_env.vector:DeepRecVectorEnv",
        kwargs={"stage": "rec"},
    )
    register(
        id="DeepRecColdStart-v0",
        entry_point="deeprec_env.env:DeepRecEnv",
        vector_entry_point="deeprec_env.vector:DeepRecVectorEnv",
        kwargs={"stage": "coldstart"},
    )
    register(id="DeepRecNumeric-v0", entry_point="deeprec_env.wrappers:DeepRecNumericEnv", kwargs={"stage": "rec"})
    register(
        id="DeepRecTools-v0",
        entry_point="deeprec_env.env:DeepRecEnv",
        vector_entry_point="deeprec_env.vector:DeepRecVectorEnv",
        kwargs={"stage": "rec", "actions": "tools", "prompt": "chat"},
    )
