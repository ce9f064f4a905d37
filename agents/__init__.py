"""Agents for DeepRec-v0: the bundled LLM policy, baselines and trainers."""
