"""Tracking at the edge: everything that talks to MLflow (``tracking.adapter``) and
what a run records, computed from plain results (``tracking.figures``).

The library never imports this; tasks record through it; flows only open runs.
"""
