"""recbole-llm: LLM-enhanced sequential and CTR recommenders as a plugin of RecBole."""
from recbole_llm import compat

compat.apply()

__version__ = "0.1.0"
