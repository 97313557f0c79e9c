"""The rules of the data every layer accepts: chat messages and their HH-RLHF text (``formats.chat``).

Standard library only, and below every other package: the store and the API
check what they take in by these rules, the orchestrator and the workers read
and encode by them, and none of them needs another layer to do so.
"""
