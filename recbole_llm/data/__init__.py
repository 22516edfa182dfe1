"""Dataset preparation helpers for recbole_llm."""
