"""The serving engines our checkpoints are for: vLLM as a verifier, GGUF for llama.cpp."""
