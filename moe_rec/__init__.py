"""moe_rec: one generative recommender for several services.

Stages, in data-flow order: ``data`` (read, validate, split, sequences) -> ``sid`` (semantic IDs)
-> ``model`` -> ``train`` / ``eval`` -> ``export`` -> ``serve``. A stage imports only the stages
before it, in this order: ``data``, ``sid``, ``model``, ``eval``, ``baselines``, ``train`` (its
validation ranks with ``eval``), ``export`` (reads ``train``'s checkpoints), ``serve``. Below them
``errors``, ``config`` and ``console``; above them ``experiment`` (every stage's config), ``stages`` and
``cli``. ``tests/test_imports.py`` checks it.
"""

__version__ = "0.1.0"
