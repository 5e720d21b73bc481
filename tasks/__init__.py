"""Prefect tasks: thin adapters that parse inputs, call the ``quantmill`` library and
return something small (a path, a URI, a dict of metrics), never a model or tensor.

They arrive with the pipeline issue.
"""
