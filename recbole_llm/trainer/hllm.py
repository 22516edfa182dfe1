"""HLLMTrainer: the shared LLM training control with HLLM's official values (properties/model/HLLM.yaml): AdamW,
10% linear warm-up then cosine decay, bf16 autocast on CUDA, no gradient clipping (the official trainer reads
``clip_grad_norm`` but never applies it)."""
from recbole_llm.trainer.llm_trainer import LLMTrainer


class HLLMTrainer(LLMTrainer):
    """``LLMTrainer`` as it is; its own module so that HLLM does not fall back to RecBole's Trainer."""
