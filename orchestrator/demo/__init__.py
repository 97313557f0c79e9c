"""The demo: a world, a simulated labeler and the ``ratchet demo`` command, apart from the service.

- ``world``: builds the demo world into a store (P0 fine-tuned on the demo
  corpus, the prompt sets, the gold preference) from ``workers.demo_world``,
  the world's data and gold function, which stays on the workers' side
  because cycles name it by path (``workers.demo_world:gold_score``) and a
  worker step scores with it;
- ``labeler``: a labeler that answers comparison tasks over the REST API by
  the gold preference, with a share of coin flips;
- ``command``: ``ratchet demo``, cycles of simulated weeks against an
  embedded store, Prefect's temporary server and the API on a loopback port.

Nothing in the service imports this package.
"""
