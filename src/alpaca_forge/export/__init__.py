"""export: merged models, weight diffs, GGUF files for llama.cpp (with a parity check)."""
