"""Built-in methods. Each module registers itself; this list is the whole registry."""

from quantmill.methods import awq, gptq, l4q, llm_int8, llm_qat, peqa, rtn, smoothquant, zeroquant

__all__ = [
    "awq",
    "gptq",
    "l4q",
    "llm_int8",
    "llm_qat",
    "peqa",
    "rtn",
    "smoothquant",
    "zeroquant",
]
