"""moe_rec: one generative recommender for several services.

Stages, in data-flow order: ``data`` (read, validate, split, sequences) -> ``sid`` (semantic IDs)
-> ``model`` -> ``train`` / ``eval`` -> ``serve``. A stage imports only the stages before it.
"""

__version__ = "0.1.0"
