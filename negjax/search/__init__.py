"""Nearest-neighbour search over embeddings, shared by mining and evaluation.

    from negjax.search import ScannIndex, exact_search, pair_scores, scann_settings, tune_search
"""

from negjax.search.index import ScannIndex, ScannParams, exact_search, pair_scores, recall_at_k
from negjax.search.tuning import (audit_recall, describe, query_samples, scann_settings,
                                  tunable_settings, tune_search)

__all__ = ["ScannIndex", "ScannParams", "audit_recall", "describe", "exact_search",
           "pair_scores", "query_samples", "recall_at_k", "scann_settings", "tunable_settings", "tune_search"]
