"""Serving: the batching engine, the OpenAI-compatible API and chat page, GPTQ quantization."""
