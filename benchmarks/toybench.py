"""Toy-world oracle benchmark (the metric functions live in :mod:`viva_base.data.toyworld.oracle`,
the lowest layer, because the trainer's evaluation computes them too; see docs/architecture.md)."""
from viva_base.data.toyworld.oracle import (average_ranks, bootstrap_ci, masked_mean_abs, oracle_scores,  # noqa: F401
                                            spearman)
