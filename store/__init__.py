"""The versioned store: ORM models, registry functions, the artifact store.

Layout:
- ``settings``: ``RATCHET_*`` settings (pydantic-settings).
- ``models``: the SQLAlchemy tables, nothing else.
- ``db``: engines, the managed session scope, schema-at-head checks.
- ``errors``: the exceptions the registry raises (routes translate them).
- ``artifacts``: the fsspec artifact store (checksummed write and read).
- one module per entity with keyword-only registry functions:
  ``datasets``, ``feedback``, ``tasks``, ``pms``, ``policies``,
  ``deployments``, ``cycles``, ``keys``, and ``lineage``.
"""
