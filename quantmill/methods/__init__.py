"""Built-in methods. Each module registers itself; this list is the whole registry."""

from quantmill.methods import awq, gptq, llm_int8, rtn, smoothquant, zeroquant

__all__ = ["awq", "gptq", "llm_int8", "rtn", "smoothquant", "zeroquant"]
