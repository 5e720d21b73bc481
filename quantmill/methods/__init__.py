"""Built-in methods. Each module registers itself; this list is the whole registry."""

from quantmill.methods import gptq, rtn

__all__ = ["gptq", "rtn"]
