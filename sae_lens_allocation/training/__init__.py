"""Glue on top of `saes/`: the single and multi-SAE runners, exact resume, data parallel, held-out
calibration rows, the gradient-carrying activation store and its cache, model and data sources.
Nothing under `saes/` or `allocation/` imports this package."""
