"""Converters between qjax and external checkpoint formats (GGUF, ...)."""
