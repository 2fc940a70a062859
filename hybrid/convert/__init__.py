"""Converters from a checkpoint hybrid loads to other runtimes' formats (GGUF for llama.cpp)."""
