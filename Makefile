# Two commands do all the set-up on a fresh machine (see README.md).
.PHONY: quantize test test-fast bench lint

quantize:  ## GPTQ 4-bit on SmolLM2-135M with evaluation (installs what it needs)
	bash scripts/quantize-example.sh

test:  ## the whole test suite (installs what it needs)
	bash scripts/test.sh

test-fast:  ## the unit tests only, for the edit-test loop (about 2 minutes)
	bash scripts/test.sh tests/unit

bench:  ## GPTQ vs RTN vs the peer toolkit on the real model, equal terms (long: hours)
	bash scripts/bootstrap.sh && .venv/bin/python benchmarks/gptq_vs_peer.py

lint:
	bash scripts/bootstrap.sh && .venv/bin/ruff check quantmill tests benchmarks
