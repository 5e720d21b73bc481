"""Zero-shot accuracy of a model through lm-evaluation-harness: offline task definitions
(``tasks``), the harness run (``harness``), recovery against the original (``recovery``)."""
