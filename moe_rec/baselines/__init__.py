"""Learned baselines evaluated under the same protocol and metrics as the generative model
(leave-one-out, full ranking over a service's items, :class:`~moe_rec.eval.metrics.RankingMetrics`).

* :mod:`moe_rec.baselines.sasrec` — SASRec trained with full softmax cross-entropy, one model per
  service; its config is :class:`moe_rec.baselines.config.SASRecConfig` (the ``sasrec:`` section).
"""
