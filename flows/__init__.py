"""Prefect flows: they only chain tasks and decide what runs in parallel.

The quantize, sweep and evaluate flows arrive with the pipeline issue; until
then the library's CLI (``quantmill quantize``) is the way to run a job.
"""
