"""The parts of HLLM (Chen et al., 2024): item texts, the item LLM, the user LLM and the InfoNCE loss.

``recbole_llm.model.sequential_recommender.hllm.HLLM`` puts them together; each part is small enough to test alone.
"""
import hashlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, LlamaConfig, LlamaModel

from recbole_llm.model.layer_stack import architecture, keep_layers, layer_list
from recbole_llm.text.cache import FORMAT_VERSION, CacheEntry, cache_root
from recbole_llm.text.encoders import is_decoder_only, encoder_path
from recbole_llm.trainer.llm_trainer import autocast, compute_dtype
from recbole_llm.text.templates import clean_text, read_item_file
from recbole_llm.utils import RecBoleLLMError

POOLINGS = ("auto", "item", "mean")
HEADS = ("generative", "late_fusion")
ITEM_TEXTS = ("auto", "side_data", "prompt")
LOSSES = ("auto", "nce", "softmax")
_TEXT_TYPES = ("token", "token_seq", "float")  # .item columns that can hold an item's words or numbers


# --- item texts ---------------------------------------------------------------------------------------------------

def item_texts(config, dataset):
    """The text of every item by RecBole internal id, built as the official code builds it: ``hllm_item_prompt``
    followed by ``<field>: <value>`` for each of ``hllm_text_fields`` whose value is not empty, with no separator.

    Row 0 ([PAD]) and items absent from the ``.item`` file get the empty string (the official code does the same).
    """
    path, frame, types = read_item_file(config)
    id_field = config["ITEM_ID_FIELD"]
    fields = config["hllm_text_fields"] or [f for f, t in types.items() if t in _TEXT_TYPES and f != id_field]
    unknown = [field for field in fields if field not in types]
    if unknown:
        raise RecBoleLLMError(f"hllm_text_fields names {', '.join(unknown)}, which {path} lacks; its fields are "
                              f"{', '.join(types)}. Fix hllm_text_fields.")
    prompt = config["hllm_item_prompt"] or ""
    by_token = {}
    for row in frame.to_dict("records"):
        parts = [f"{field}: {value}" for field in fields if (value := clean_text(row[field]))]
        by_token[row[id_field]] = prompt + "".join(parts)
    tokens = dataset.field2id_token[id_field]
    return [""] + [by_token.get(str(token), "") for token in tokens[1:]]


def item_token_table(texts, tokenizer, max_length, n_item_tokens):
    """``(ids, mask)``, both ``[len(texts), max_length + n_item_tokens]``: each text tokenised with the tokenizer's
    special tokens, cut to ``max_length``, followed by ``n_item_tokens`` placeholders, and LEFT-padded.

    Left-padding to one fixed width makes the column index the official right-aligned position id: a text of n
    tokens sits at positions ``max_length - n .. max_length - 1`` and [ITEM] at ``max_length`` whatever n is.
    """
    width = max_length + n_item_tokens
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = tokenizer.encode(text)[:max_length] + [0] * n_item_tokens
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    return ids, mask


# --- the two LLMs -------------------------------------------------------------------------------------------------

def load_base_llm(path, pretrained, num_layers, key, **overrides):
    """A Hugging Face base model (no LM head) from folder ``path``: its weights when ``pretrained``, else its
    architecture randomly initialised; ``num_layers`` keeps the first layers only (~ = all); ``overrides`` set
    other config attributes."""
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    overrides["use_cache"] = False
    if num_layers is not None:
        available = hf_config.num_hidden_layers
        if not 1 <= num_layers <= available:
            layers_key = key.replace("_llm", "_num_layers")
            raise RecBoleLLMError(f"{key} '{path}' has {available} layers; set {layers_key} to 1..{available} or ~, "
                                  f"not {num_layers}.")
        overrides["num_hidden_layers"] = num_layers
    if pretrained:
        return AutoModel.from_pretrained(path, local_files_only=True, **overrides)
    for name, value in overrides.items():
        setattr(hf_config, name, value)
    return AutoModel.from_config(hf_config)


def fresh_llama(hidden_size, num_layers, num_heads, inner_size, max_positions, attention_dropout=0.0):
    """A randomly initialised causal Llama that reads ``inputs_embeds`` only (its one-row vocabulary is unused)."""
    if num_layers is None or hidden_size % num_heads:
        raise RecBoleLLMError(
            f"the user LLM built in code needs hllm_user_num_layers set and a width divisible by hllm_user_num_heads; "
            f"got {num_layers} layers, width {hidden_size}, {num_heads} heads. Fix those keys or set hllm_user_llm.")
    hf_config = LlamaConfig(vocab_size=1, hidden_size=hidden_size, intermediate_size=inner_size,
                            num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            num_key_value_heads=num_heads, max_position_embeddings=max_positions, use_cache=False,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None,
                            attention_dropout=attention_dropout)
    return LlamaModel(hf_config)


def user_llm(config, item_dim):
    """The user LLM: ``hllm_user_llm`` (a decoder-only model) or a fresh Llama of ``hllm_user_*`` sizes. Its word
    embeddings are frozen: item vectors come in as ``inputs_embeds`` and words are never read.
    ``hllm_user_dropout`` is its attention dropout."""
    dropout = user_dropout(config)
    if config["hllm_user_llm"] is None:
        model = fresh_llama(config["hllm_user_hidden_size"] or item_dim, config["hllm_user_num_layers"],
                            config["hllm_user_num_heads"], config["hllm_user_inner_size"],
                            config["MAX_ITEM_LIST_LENGTH"], dropout)
    else:
        path = encoder_path(config, "hllm_user_llm")
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        if not is_decoder_only(hf_config):
            raise RecBoleLLMError(f"hllm_user_llm '{path}' is not a decoder-only (causal) model; the user LLM must "
                                  f"be one (Llama, Qwen, Mistral, ...). Point hllm_user_llm at such a model, or set "
                                  f"it ~.")
        if dropout and not hasattr(hf_config, "attention_dropout"):
            raise RecBoleLLMError(f"hllm_user_dropout needs a user LLM whose config has attention_dropout; "
                                  f"hllm_user_llm '{path}' ({hf_config.model_type}) has none. Set "
                                  f"hllm_user_dropout: 0.")
        model = load_base_llm(path, config["hllm_user_llm_pretrained"], config["hllm_user_num_layers"], "hllm_user_llm",
                              **({"attention_dropout": dropout} if dropout else {}))
    model.get_input_embeddings().requires_grad_(False)
    return model


class PassInputsEmbeds(nn.Module):
    """Stands in for a BERT-style model's embedding stage, which would add positions and a LayerNorm: the
    ``inputs_embeds`` given to the model are already a lower layer's output states. It keeps the (unused, frozen)
    word embeddings, which Hugging Face's ``get_input_embeddings`` and gradient checkpointing look up."""

    def __init__(self, word_embeddings):
        super().__init__()
        self.word_embeddings = word_embeddings.requires_grad_(False)

    def forward(self, inputs_embeds=None, **_):
        return inputs_embeds


class ItemLLM(nn.Module):
    """The item LLM: every item's text, then a learnable [ITEM] vector; the item vector is the last layer's state
    at [ITEM] (``item`` pooling) or the mean over the text's tokens (``mean`` pooling, no [ITEM]).

    The token table of all items is built once (``item_token_table``). A batch of items is cut to its longest
    text, so items are encoded independently, in padded batches with masks and right-aligned positions.

    With ``hllm_item_trainable_layers`` N, every item goes once through the layers below the top N (in eval mode,
    under ``no_grad``); their output states are kept as a buffer (``lower_states``), those layers and the embedding
    stage are dropped and the word embeddings frozen. Training then runs the top N layers only. Below the top, the text does not attend to
    [ITEM] (no change for a causal decoder, where [ITEM] comes last; a BERT-style encoder's text does see it in
    the whole model), no dropout acts, and the [ITEM] slot keeps the state of the initial [ITEM] vector, to which
    a trainable shift (``item_shift``, zero at the start) is added. So with a decoder the item vectors start
    equal to those of the whole model.
    """

    def __init__(self, config, dataset):
        super().__init__()
        self.pooling = item_pooling(config)
        path = encoder_path(config, "hllm_item_llm")
        self.llm = load_base_llm(path, config["hllm_item_llm_pretrained"], config["hllm_item_num_layers"], "hllm_item_llm")
        self.dim = self.llm.config.hidden_size
        n_item_tokens = int(self.pooling == "item")
        width = config["hllm_max_text_length"] + n_item_tokens
        limit = getattr(self.llm.config, "max_position_embeddings", width)
        if width > limit:
            raise RecBoleLLMError(f"hllm_max_text_length {width - n_item_tokens} leaves no room for the [ITEM] "
                                  f"position within hllm_item_llm's {limit} positions; lower it to "
                                  f"{limit - n_item_tokens}.")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ids, mask = item_token_table(item_texts(config, dataset), tokenizer, config["hllm_max_text_length"],
                                     n_item_tokens)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("token_mask", mask, persistent=False)
        if n_item_tokens:
            self.item_token = nn.Parameter(torch.randn(self.dim) * 0.02)  # N(0, 0.02), as the official init
        self.batch_size = config["hllm_item_batch_size"]
        self.dtype = compute_dtype(config)  # autocast here too, so that evaluation runs in it as training does
        top = trainable_item_layers(config, self.llm)
        if top:
            self._keep_top_layers(top)

    @property
    def top_only(self):
        """Whether only the top layers run, over the kept lower-layer states."""
        return hasattr(self, "lower_states")

    def _inputs(self, items):
        """``(inputs_embeds, mask, positions)`` of the items' columns that are not padding in every row: the word
        (and [ITEM]) embeddings, or the kept lower-layer states with the [ITEM] shift."""
        mask = self.token_mask[items]
        start = int((mask.sum(0) == 0).sum())  # leading columns that are padding in every row
        mask = mask[:, start:]
        positions = torch.arange(start, self.token_mask.size(1), device=mask.device).expand_as(mask)
        if self.top_only:
            embeds = self.lower_states[items][:, start:]
            if self.pooling == "item":
                slot = self.item_slot_states[items] + self.item_shift
                embeds = torch.cat([embeds[:, :-1], slot.unsqueeze(1)], dim=1)
            return embeds, mask, positions
        embeds = self.llm.get_input_embeddings()(self.token_ids[items][:, start:])
        if self.pooling == "item":
            embeds = torch.cat([embeds[:, :-1], self.item_token.to(embeds.dtype).expand(len(items), 1, -1)], dim=1)
        return embeds, mask, positions

    def forward(self, items):
        """``[len(items), dim]``: the vectors of the internal item ids ``items``."""
        embeds, mask, positions = self._inputs(items)
        with autocast(self.dtype, mask.device):
            hidden = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        hidden = hidden.float()
        if self.pooling == "item":
            return hidden[:, -1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return torch.where(weights > 0, hidden, 0.0).sum(1) / weights.sum(1).clamp(min=1)

    @torch.no_grad()
    def _keep_top_layers(self, top):
        """Keep every item's text states below the top ``top`` layers as ``lower_states`` (``[n_items, width, dim]``,
        padding zero), computed with the text unable to attend to [ITEM], so that they depend on the pretrained
        weights only and are rebuilt alike at each build; with [ITEM] pooling, the [ITEM] column's state (which
        depends on the random initial [ITEM] vector) as ``item_slot_states``, saved with the model. Then drop the
        lower layers and the embedding stage."""
        kind = architecture(self.llm)
        if kind == "other":
            raise RecBoleLLMError(f"hllm_item_trainable_layers needs a BERT-style encoder or a Llama-style decoder "
                                  f"as hllm_item_llm, not {type(self.llm).__name__}; set it to ~.")
        n_lower = len(layer_list(self.llm, "hllm_item_llm")) - top
        with_slot = self.pooling == "item"
        was_training = self.training
        self.eval()  # the kept states are those of the network without dropout
        states = torch.zeros(*self.token_ids.shape, self.dim)
        slots = torch.zeros(len(self.token_ids), self.dim)
        for part in torch.arange(len(self.token_ids)).split(self.batch_size):
            embeds, mask, positions = self._inputs(part)
            text = mask.clone()
            if with_slot:
                text[:, -1] = 0
            states[part, -mask.size(1):] = self._states(embeds, text, positions, n_lower) * text.unsqueeze(-1)
            if with_slot:
                slots[part] = self._states(embeds, mask, positions, n_lower)[:, -1]
        self.train(was_training)
        self.register_buffer("lower_states", states, persistent=False)
        keep_layers(self.llm, list(range(n_lower, n_lower + top)), "hllm_item_llm")
        if kind == "bert-style":
            self.llm.embeddings = PassInputsEmbeds(self.llm.get_input_embeddings())
        else:  # a Llama-style model takes inputs_embeds straight into its first layer
            self.llm.get_input_embeddings().requires_grad_(False)
        if with_slot:
            del self.item_token
            self.register_buffer("item_slot_states", slots)
            self.item_shift = nn.Parameter(torch.zeros(self.dim))

    def _states(self, embeds, mask, positions, layer):
        """The output states of the first ``layer`` layers (``layer`` >= 1)."""
        with autocast(self.dtype, mask.device):
            output = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                              output_hidden_states=True)
        return output.hidden_states[layer].float()

    def encode(self, items, batch_size=None):
        """``[len(items), dim]``: the vectors of ``items`` in forward passes of at most ``batch_size`` items (~ = one
        pass), texts of similar length together so that each pass pads little. Items are encoded independently, so
        the split changes neither the vectors nor their gradients."""
        order = torch.argsort(self.token_mask[items].sum(1), stable=True)
        parts = [self(items[part]) for part in order.split(batch_size or len(order))]
        return torch.cat(parts)[torch.argsort(order)]

    @torch.no_grad()
    def encode_all(self):
        """``[n_items, dim]``: every item's vector (row 0 too), in eval mode, ``hllm_item_batch_size`` items per
        pass, under ``no_grad``."""
        was_training = self.training
        self.eval()
        vectors = self.encode(torch.arange(len(self.token_ids), device=self.token_ids.device), self.batch_size)
        self.train(was_training)
        return vectors


def item_llm_fingerprint(item_llm):
    """SHA-256 of everything an item vector depends on: the pooling, the token table and every weight."""
    digest = hashlib.sha256(item_llm.pooling.encode())
    tensors = {"token_ids": item_llm.token_ids, "token_mask": item_llm.token_mask, **item_llm.state_dict()}
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_item_table(item_llm, config):
    """``[n_items, dim]``: ``item_llm.encode_all()``, kept in the side-data cache (``<cache root>/hllm/``) and read
    back by any later run whose item LLM, texts and pooling are the same (the key is their fingerprint)."""
    fingerprint = item_llm_fingerprint(item_llm)
    key = {"kind": "hllm_items", "fingerprint": fingerprint, "version": FORMAT_VERSION}
    entry = CacheEntry(cache_root(config) / "hllm", f"items-{fingerprint[:16]}")
    rows = [str(row) for row in range(len(item_llm.token_ids))]  # rows are internal ids, fixed by the token table
    matrix, _, _ = entry.get(key, lambda: (item_llm.encode_all().cpu().numpy(), rows))
    return torch.from_numpy(matrix)


def choice(config, key, options):
    """``config[key]``, which must be one of ``options``."""
    value = config[key]
    if value not in options:
        raise RecBoleLLMError(f"{key} '{value}' is unknown; use one of {', '.join(options)}.")
    return value


def item_pooling(config):
    """``hllm_item_pooling``, with ``auto`` = ``item`` when the item LLM trains and ``mean`` when it is frozen (an
    [ITEM] vector that never trains is random noise in a frozen model)."""
    pooling = choice(config, "hllm_item_pooling", POOLINGS)
    if pooling == "auto":
        return "mean" if config["hllm_freeze_item_llm"] else "item"
    return pooling


def item_text_choice(config):
    """``hllm_item_text``: ``side_data`` (the frozen item vectors are the side-data cache's, see ``item_vectors`` in
    recbole_llm.text) or ``prompt`` (the official text through ``ItemLLM``). ``auto`` is side_data when the item LLM
    is frozen and is the side-data encoder itself, else prompt."""
    text = choice(config, "hllm_item_text", ITEM_TEXTS)
    frozen = config["hllm_freeze_item_llm"]
    if text == "auto":
        return "side_data" if frozen and _side_data_mismatch(config) is None else "prompt"
    if text == "side_data" and not frozen:
        raise RecBoleLLMError("hllm_item_text: side_data reads fixed vectors from the side-data cache, so the item "
                              "LLM cannot train; set hllm_freeze_item_llm: True, or use hllm_item_text: prompt (or "
                              "auto) to train end to end.")
    mismatch = _side_data_mismatch(config) if text == "side_data" else None
    if mismatch:
        raise RecBoleLLMError(f"hllm_item_text: side_data takes the vectors of llm_encoder, unchanged, but {mismatch}; "
                              f"make them agree (leave the hllm_item_llm keys at their defaults, or set llm_encoder), "
                              f"or use hllm_item_text: prompt.")
    return text


def _side_data_mismatch(config):
    """Why the configured item LLM is not the side-data encoder (``llm_encoder``, whole and pretrained), or None."""
    item_llm, encoder = encoder_path(config, "hllm_item_llm").resolve(), encoder_path(config).resolve()
    if item_llm != encoder:
        return f"hllm_item_llm is '{item_llm}' and llm_encoder '{encoder}'"
    if config["hllm_item_num_layers"] is not None:
        return f"hllm_item_num_layers keeps {config['hllm_item_num_layers']} of its layers"
    if not config["hllm_item_llm_pretrained"]:
        return "hllm_item_llm_pretrained is False"
    return None


def loss_choice(config):
    """``hllm_loss``: ``nce`` (the official sampled InfoNCE) or ``softmax`` (over every item, frozen mode only);
    ``auto`` is ``softmax`` when the item table is frozen and ``nce`` end to end."""
    loss = choice(config, "hllm_loss", LOSSES)
    frozen = config["hllm_freeze_item_llm"]
    if loss == "auto":
        return "softmax" if frozen else "nce"
    if loss == "softmax" and not frozen:
        raise RecBoleLLMError("hllm_loss: softmax scores every item at every step, which needs the frozen item table "
                              "(hllm_freeze_item_llm: True); end to end it would run every item through the item LLM "
                              "each step. Use hllm_loss: nce or auto to train end to end.")
    return loss


def trainable_item_layers(config, llm):
    """``hllm_item_trainable_layers``: ~, or how many of the item LLM ``llm``'s top layers train end to end over
    the kept states of the layers below (its layer stack is looked up only then)."""
    top = config["hllm_item_trainable_layers"]
    if top is None:
        return None
    if config["hllm_freeze_item_llm"]:
        raise RecBoleLLMError("hllm_item_trainable_layers trains the item LLM's top layers end to end; with "
                              "hllm_freeze_item_llm: True no layer trains. Set one of them differently.")
    if not config["hllm_item_llm_pretrained"]:
        raise RecBoleLLMError("hllm_item_trainable_layers keeps the layers below the top ones frozen, which with "
                              "hllm_item_llm_pretrained: False would be random; load the pretrained weights or set "
                              "hllm_item_trainable_layers: ~.")
    n_layers = len(layer_list(llm, "hllm_item_llm"))
    if not isinstance(top, int) or not 1 <= top < n_layers:
        raise RecBoleLLMError(f"hllm_item_trainable_layers must be 1..{n_layers - 1} (the item LLM has {n_layers} "
                              f"layers) or ~ (all train), not {top!r}.")
    return top


def item_micro_batch(config):
    """``hllm_item_micro_batch``: a positive number of items, or ~."""
    size = config["hllm_item_micro_batch"]
    if size is not None and (not isinstance(size, int) or size < 1):
        raise RecBoleLLMError(f"hllm_item_micro_batch must be a positive number of items or ~ (one pass), not "
                              f"{size!r}.")
    return size


ADAPTER_AUTO_WIDTH = 1536  # the width measured best on ml-100k and ml-1m-half (results/ml-1m-half-hllm.md)


DROPOUT_AUTO = 0.2  # the rate measured best over a frozen item table on ml-1m-half (results/ml-1m-half-hllm.md)


def user_dropout(config):
    """``hllm_user_dropout``: the dropout probability on the user LLM's inputs and attention weights; ``auto`` is
    ``DROPOUT_AUTO`` when the item table is frozen and 0 end to end (the official model has none)."""
    p = config["hllm_user_dropout"]
    if p == "auto":
        return DROPOUT_AUTO if config["hllm_freeze_item_llm"] else 0.0
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise RecBoleLLMError(f"hllm_user_dropout must be a probability in [0, 1) or auto, not {p!r}; 0 is the "
                              f"official model (no dropout).")
    return float(p)


def item_whiten(config):
    """``hllm_item_whiten``: whether the frozen item table is PCA-whitened; ``auto`` is True when the table is frozen
    and False end to end, where the item LLM's vectors change at every step."""
    whiten = config["hllm_item_whiten"]
    frozen = config["hllm_freeze_item_llm"]
    if whiten == "auto":
        return frozen
    if not isinstance(whiten, bool):
        raise RecBoleLLMError(f"hllm_item_whiten must be True, False or auto, not {whiten!r}.")
    if whiten and not frozen:
        raise RecBoleLLMError("hllm_item_whiten whitens the frozen item table (hllm_freeze_item_llm: True); end to "
                              "end the item LLM's vectors change every step. Set hllm_item_whiten: False or auto.")
    return whiten


def item_adapter_size(config):
    """``hllm_item_adapter``: the hidden width of the trainable head over the frozen item table, 0 for none;
    ``auto`` is ``ADAPTER_AUTO_WIDTH`` when the table is frozen and 0 end to end, where the item LLM itself trains."""
    size = config["hllm_item_adapter"]
    frozen = config["hllm_freeze_item_llm"]
    if size == "auto":
        return ADAPTER_AUTO_WIDTH if frozen else 0
    if isinstance(size, str) or size < 0:  # the config's type check has made it an int or a str
        raise RecBoleLLMError(f"hllm_item_adapter must be a hidden width (a positive int), 0 (none) or auto, not "
                              f"{size!r}.")
    if size and not frozen:
        raise RecBoleLLMError("hllm_item_adapter trains a head over the frozen item table (hllm_freeze_item_llm: "
                              "True); end to end the item LLM itself trains. Set hllm_item_adapter: 0 or auto.")
    return size


class ItemAdapter(nn.Module):
    """A trainable residual MLP over frozen item vectors, ``v + W2 gelu(W1 v + b1) + b2`` (a deviation: the paper's
    frozen item LLM has no trainable part). ``W2`` and ``b2`` start at zero, so training starts from the frozen
    vectors, as end-to-end training starts from the pretrained item LLM."""

    def __init__(self, dim, hidden_size):
        super().__init__()
        self.hidden = nn.Linear(dim, hidden_size)
        self.out = nn.Linear(hidden_size, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, vectors):
        return vectors + self.out(F.gelu(self.hidden(vectors)))


# --- the generative loss ------------------------------------------------------------------------------------------

def uniform_items(count, n_items, device):
    """``count`` item ids drawn uniformly from 1..n_items-1 ([PAD] never), with repeats, as the official sampler."""
    return torch.randint(1, n_items, (count,), device=device)


class _GatherRows(torch.autograd.Function):
    """All ranks' rows (equal counts per rank), concatenated in rank order; the backward pass sums every rank's
    gradient of the whole and hands each rank the slice of its own rows."""

    @staticmethod
    def forward(ctx, local):
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows, ctx.rank = len(local), dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_negatives(negatives):
    """The negatives of every DDP rank, ``[world * K, D]``, with gradients flowing back to each rank's own."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return negatives
    return _GatherRows.apply(negatives)


def nce_logits(outputs, positives, negatives, logit_scale, threshold):
    """``[N, 1 + K]`` logits of HLLM's InfoNCE: column 0 is the positive.

    ``outputs``, ``positives`` ``[N, D]`` and the shared ``negatives`` ``[K, D]`` are L2-normalised; every logit is a
    cosine times ``exp(logit_scale)``. A negative whose cosine with the row's positive exceeds ``threshold`` (a
    near-duplicate of the positive, the positive itself included) is masked out with -inf.
    """
    outputs, positives, negatives = (F.normalize(x, dim=-1) for x in (outputs, positives, negatives))
    logits = torch.cat([(outputs * positives).sum(-1, keepdim=True), outputs @ negatives.T], dim=-1)
    logits = logits * logit_scale.exp()
    # Masked after scaling: -inf times the scale would give the scale a NaN gradient.
    duplicates = F.pad(positives @ negatives.T > threshold, (1, 0), value=False)
    return logits.masked_fill(duplicates, float("-inf"))


def nce_loss(outputs, positives, negatives, logit_scale, threshold):
    """Cross-entropy with the positive as the label, averaged over the ``N`` rows (the valid positions)."""
    logits = nce_logits(outputs, positives, negatives, logit_scale, threshold)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def cosines(users, items):
    """``[len(users), len(items)]``: the cosine of every pair."""
    return F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T


def softmax_logits(outputs, items, logit_scale):
    """``[N, n_items]``: the cosine of each output with every item times ``exp(logit_scale)``; column 0 ([PAD]) is
    -inf (after scaling, as in ``nce_logits``), so padding takes no probability."""
    logits = cosines(outputs, items) * logit_scale.exp()
    return logits.masked_fill(torch.arange(len(items), device=logits.device) == 0, float("-inf"))


def softmax_loss(outputs, targets, items, logit_scale):
    """Cross-entropy of the target item ids over every item of ``items`` ``[n_items, D]``, averaged over the rows."""
    return F.cross_entropy(softmax_logits(outputs, items, logit_scale), targets)


def clamp_logit_scale(logit_scale, max_scale=100.0):
    """Keep ``exp(logit_scale)`` in [1, ``max_scale``], in place, as the official code does before every loss."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, math.log(max_scale))


# --- the late-fusion discriminative head (paper-derived: not in the official code) ----------------------------------

class LateFusionHead(nn.Module):
    """An MLP over ``[user vector; item vector]`` giving one logit (HLLM paper, late fusion). Its first layer is
    split into a user part and an item part, so that every item can be scored against a user cheaply."""

    def __init__(self, user_dim, item_dim, hidden_size):
        super().__init__()
        self.user_in = nn.Linear(user_dim, hidden_size)
        self.item_in = nn.Linear(item_dim, hidden_size, bias=False)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden_size, 1))

    def forward(self, users, items):
        """``[N]`` logits of the pairs ``users[i]``, ``items[i]``."""
        return self.out(self.user_in(users) + self.item_in(items)).squeeze(-1)

    def score_all(self, users, items, chunk=64):
        """``[len(users), len(items)]`` logits of every pair, ``chunk`` users at a time to bound memory."""
        item_part = self.item_in(items)
        return torch.cat([self.out(self.user_in(part)[:, None] + item_part[None]).squeeze(-1)
                          for part in users.split(chunk)])
