"""Train SmolLM2-135M on DeepRec-v0 with TRL on a CPU: an SFTTrainer warm start, then GRPOTrainer.

Run from the repository root: ``PYTHONPATH=. python examples/trl_grpo.py --out runs/trl_grpo`` (log.json).
"""

import argparse
import json
import pathlib

from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from agents.llm import load_causal_lm
from agents.trl_adapter import DeepRecRollout, demonstration_dataset, prompt_dataset, reward_functions

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/trl_grpo")
out = pathlib.Path(ap.parse_args().out)
# RL user group's test targets; short prompts and item lists keep a CPU step to minutes
env_kwargs = {"split": "test", "user_group": "rl", "stage": "rec", "prompt_history": 5, "retrieval_k": 10}
model, tok = load_causal_lm("smollm2")  # the embedded GGUF, dequantised; a hub id or a path works too
prompts = prompt_dataset(**env_kwargs)
demos = demonstration_dataset(tok, env_kwargs, users=prompts["user"][:24])  # scripted agent's transcripts
common = dict(use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0, bf16=False,
              gradient_checkpointing=False)  # fmt: skip
sft = SFTConfig(output_dir=str(out / "sft"), num_train_epochs=1, per_device_train_batch_size=4,
                learning_rate=1e-4, max_length=None, **common)  # fmt: skip
(warm := SFTTrainer(model=model, args=sft, train_dataset=demos, processing_class=tok)).train()
grpo = GRPOConfig(output_dir=str(out / "grpo"), max_steps=3, per_device_train_batch_size=2,  # 8 episodes a step
                  gradient_accumulation_steps=4, num_generations=4, temperature=1.0, learning_rate=1e-5,
                  **common)  # fmt: skip
trainer = GRPOTrainer(model=model, args=grpo, processing_class=tok, train_dataset=prompts.select(range(24, 96)),
                      rollout_func=DeepRecRollout(env_kwargs, max_new_tokens=192),
                      reward_funcs=reward_functions(env_kwargs))  # fmt: skip
trainer.train()
out.mkdir(parents=True, exist_ok=True)
logs = {"env_kwargs": env_kwargs, "sft_log": warm.state.log_history, "log": trainer.state.log_history}
(out / "log.json").write_text(json.dumps(logs, indent=1))
for row in trainer.state.log_history:
    if "reward" in row:
        print(f"step {row['step']}: reward {row['reward']:.3f} (std {row['reward_std']:.3f})")
