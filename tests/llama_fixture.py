"""A tiny Llama built offline in code: a Llama-2-style tokenizer saved beside a random ``LlamaForCausalLM``, so that
RecLoRA, SLMRec and HLLM load both from one folder, as they load a real Llama.

The tokenizer is what a real Llama-2 tokenizer is in small: a SentencePiece-style BPE over ``▁``-prefixed word
pieces with byte fallback (``<0x0A>`` for a newline), a Metaspace pre-tokenizer that prepends ``▁`` to the first
word only, ``<unk>``, ``<s>`` and ``</s>`` at ids 0, 1 and 2, a BOS added in front of every text, no EOS, and
no pad token. Its words are those of the plugin's default prompts, so that ``"Yes"`` after a space is the single
piece ``▁Yes``; any other word falls back to single characters.
"""
import re
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

from recbole_llm.data.ctr import ANSWERS, NOTES, render_prompt

PROPERTIES = Path(__file__).resolve().parents[1] / "properties" / "model"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Llama-2
PROMPT_KEYS = {"RecLoRA": ["reclora_chat_template"], "SLMRec": ["slmrec_instruction", "slmrec_response"],
               "HLLM": ["hllm_item_prompt"]}


def prompt_words():
    """The words of the plugin's default prompt texts (the models' YAML and ReLLa's CTR prompt) and answers."""
    texts = [yaml.safe_load((PROPERTIES / f"{model}.yaml").read_text(encoding="utf-8"))[key]
             for model, keys in PROMPT_KEYS.items() for key in keys]
    texts += [render_prompt("male", "writer", "35-44", [], "", mode) for mode in NOTES] + list(ANSWERS.values())
    return sorted(set(re.findall(r"[A-Za-z]+", " ".join(texts))))


def bpe_pieces(words):
    """``(vocab, merges)``: the special tokens, the 256 byte pieces, ``▁`` and the printable ASCII characters,
    then ``▁word`` for every word with the merges that build it left to right (``▁ Y``, ``▁Y e``, ``▁Ye s``)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update((f"<0x{byte:02X}>", len(SPECIAL_TOKENS) + byte) for byte in range(256))
    for char in ["▁"] + [chr(code) for code in range(0x21, 0x7F)]:
        vocab.setdefault(char, len(vocab))
    merges = []
    for word in words:
        piece = "▁"
        for char in word:
            if piece + char not in vocab:
                merges.append((piece, char))
                vocab[piece + char] = len(vocab)
            piece += char
    return vocab, merges


def llama_tokenizer(words=None):
    """A Llama-2-style ``LlamaTokenizerFast`` whose word pieces are ``words`` (default: ``prompt_words()``)."""
    vocab, merges = bpe_pieces(prompt_words() if words is None else words)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Llama's pipeline: no normaliser, ``▁`` for spaces and before the first word, the text not split at spaces.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              legacy=False)


def save_tiny_llama(folder, seed=0, **sizes):
    """Save a random ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads, 512 positions unless ``sizes`` says
    otherwise) and ``llama_tokenizer()`` in ``folder``; return its path as a string."""
    tokenizer = llama_tokenizer()
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
                                         **{**values, **sizes}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
