"""Quantization-aware training: straight-through fake quantization (``ste``), the
shared training loop with checkpoints and resume (``loop``) and training text
(``data``). The methods using them are in ``quantmill.methods`` (llm_qat, peqa, l4q)."""
