"""deeprec-env: a Gymnasium environment for LLM-based recommendation (DeepRec, arXiv 2505.16810)."""

__version__ = "0.1.0"
