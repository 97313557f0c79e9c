"""The RL math of the policy-improvement methods, in small pure modules.

- ``types``: ``PPOStats``, the detached diagnostics of one PPO loss evaluation.
- ``kl``: KL estimators, per-token KL-penalised rewards, KL controllers, sqrt(KL) for charts.
- ``advantages``: masked whitening and GAE over response tokens.
- ``losses``: the clipped policy and value losses, with detached stats.
- ``preference``: DPO and IPO losses over (A, B, target) pairs, ties included.
- ``group``: critic-free baselines over k samples a prompt (RLOO, GRPO).

Sources: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et
al. 2019 (per-token KL penalty, adaptive controller), Schulman 2020
("Approximating KL divergence", the k1/k3 estimators), Bai et al. 2022;
Rafailov et al. 2023 (DPO), Azar et al. 2023 (IPO), Ahmadian et al. 2024
(RLOO), Shao et al. 2024 (GRPO).
"""
