"""The MTP transformer, its tokenizer, checkpoint formats and named models."""
