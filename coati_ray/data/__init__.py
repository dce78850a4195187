"""Datasets, the demo task, the tokenizer and chat formatting."""
