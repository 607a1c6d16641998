"""Adapters between imtm and the libraries its users already train with.

- :mod:`imtm.interop.metric_learning`: pytorch-metric-learning miners feed imtm's losses, and PML
  losses train from imtm's score matrices (``pip install "imtm[pml]"`` for the latter).
"""
