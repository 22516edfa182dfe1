"""LLM side data (DESIGN.md §4): item and user texts, text encoders, and the on-disk cache of their vectors.

Models call ``item_vectors``, ``user_vectors``, ``pca_item_vectors`` and ``similar_users``; each builds what the
cache lacks on first use. ``python -m recbole_llm.text build --dataset NAME`` builds everything ahead.
"""
from recbole_llm.text.side_data import (
    SideData,
    item_vectors,
    pca_item_vectors,
    similar_users,
    time_ordered_histories,
    training_histories,
    user_vectors,
)

__all__ = ["SideData", "item_vectors", "pca_item_vectors", "similar_users", "time_ordered_histories",
           "training_histories", "user_vectors"]
