"""Training steps (sample, train_pm, ppo, evaluate) as plain Python.

A worker step is ``run(cfg) -> result``: a typed config in, artifacts and
metrics out. Workers import neither ``store``, ``api`` nor Prefect.
"""
