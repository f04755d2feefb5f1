"""Readers of files that other tools define (a Hugging Face tokenizer.json, a model
directory's config.json), without torch: config loading reads them to resolve `auto`."""
