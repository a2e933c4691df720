"""Evaluation: sandboxed execution, benchmarks, pass@k, generation and self-speculative decoding."""
