"""The old home of the LLM-ESR mixins and ``AllPositions``, kept so that imports written against it still work.

``DualLLM``, ``LLMESR`` and ``TransformerViews`` now live in ``recbole_llm.model.llmesr``, ``AllPositions`` in
``recbole_llm.model.all_positions``. Import them from there.
"""
from recbole_llm.model.all_positions import AllPositions  # noqa: F401
from recbole_llm.model.llmesr import DualLLM, LLMESR, TransformerViews  # noqa: F401
