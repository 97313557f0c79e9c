"""What the worker steps share; none of these modules is a step.

- ``config``: typed step configs from JSON and ``key=value`` overrides, the step CLI, the errors.
- ``runtime``: device, dtype, seeds, RNG state, progress bars.
- ``data``: JSONL prompt sets and comparisons, hashed splits.
- ``chat``: message lists (chat prompts), their HH-RLHF rendering and the one prompt-encoding rule (standard
  library only: the store and the API use it too).
- ``distributed``: the steps under torchrun (DDP, FSDP2), the world's shares and collectives.
- ``modeling``: loading and saving Hugging Face model directories (never pickle), attention masks.
- ``generation``: the batched decode loop and its seeded token draws (sample, ppo, evaluate, best_of_n).
- ``rollout``: the padded rollout layout, policy and reference log-probs, PM scores of token ids.
- ``pm``, ``score``: the preference model and its loss; PM directories, loading and scoring.
- ``schedule``: the training loops' data order and learning-rate schedule (train_pm, sft).
- ``checkpoint``, ``metrics``: resumable checkpoints; metrics files, checksums, step results.
- ``testing``: tiny models and tokenizers for tests, the demo and benchmarks.
"""
