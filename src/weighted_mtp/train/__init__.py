"""Training engine: one trainer for every pipeline, distributed setup, checkpoints."""
