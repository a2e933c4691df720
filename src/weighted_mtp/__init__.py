"""Weighted Multi-Token Prediction: fine-tune multi-token-prediction code LLMs with per-token weights."""

__version__ = "0.1.0"
