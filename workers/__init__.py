"""Training steps as plain Python, one entry module each, run as ``python -m workers.<step>``.

The steps: ``sample``, ``train_pm``, ``ppo``, ``evaluate``, ``sft`` and
``best_of_n``. A worker step is ``run(cfg) -> result``: a typed config in,
artifacts and metrics out. What several steps share lives in
``workers.common`` (config, data, models, generation, PM directories,
checkpoints, metrics); the RL math in ``workers.rl``; ``demo_world`` is the
demo's pure-Python world (prompts, corpus, gold score). Workers import
neither ``store``, ``api`` nor Prefect.
"""
