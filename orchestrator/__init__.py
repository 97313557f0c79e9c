"""Prefect flows and tasks of the weekly cycle, its schedule, and the ``ratchet`` CLI.

Nothing here imports torch at module level: the in-process runner imports a
worker step only when it runs one.
"""
