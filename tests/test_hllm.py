"""HLLM: item texts, the item and user LLMs, the InfoNCE and softmax losses, the frozen and end-to-end modes,
the side-data item vectors, the micro-batched item pass, errors."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from recbole.data import data_preparation
from recbole.utils import init_seed
from transformers import AutoTokenizer, GPT2Config

from recbole_llm.config import Config
from recbole_llm.model import hllm_layers
from recbole_llm.model.hllm_layers import (item_adapter_size, item_texts, item_token_table, nce_logits, nce_loss,
                                           softmax_logits, softmax_loss)
from recbole_llm.model.layers import whitened
from recbole_llm.model.sequential_recommender.hllm import HLLM
from recbole_llm.quick_start import _build_trainer, load_data_and_model, run_recbole_llm
from recbole_llm.text import SideData, item_vectors
from recbole_llm.text.encoders import TextEncoder, encoder_path
from recbole_llm.utils import RecBoleLLMError, create_dataset, get_trainer
from conftest import checkpointing_gradients, is_checkpointing, tiny_config, write_tiny_dataset
from llama_fixture import save_tiny_llama
from hllm_ranks import gather_on_rank
from test_ddp import free_port

PROMPT = "Compress the following sentence into embedding: "


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tiny dataset, a tiny random Llama (hidden 32) saved with a Llama-2-style tokenizer, and a GPT-2 config."""
    path = tmp_path_factory.mktemp("hllm")
    write_tiny_dataset(path / "data")
    save_tiny_llama(path / "llama", max_position_embeddings=64)
    # a decoder whose config has no attention_dropout
    GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=8).save_pretrained(path / "gpt2")
    return path


def hllm_config(workdir, **overrides):
    """Frozen 1-layer MiniLM items (no prompt, 16 tokens; so hllm_item_text auto is prompt), a 1-layer user Llama
    of width 16: cheap steps. The official InfoNCE without dropout, which frozen mode's auto values replace."""
    values = {"model": "HLLM", "hllm_item_num_layers": 1, "hllm_item_prompt": "", "hllm_max_text_length": 16,
              "hllm_loss": "nce", "hllm_user_dropout": 0.0,
              "hllm_user_num_layers": 1, "hllm_user_hidden_size": 16, "hllm_user_inner_size": 32,
              "hllm_num_negatives": 32, "train_batch_size": 20, "metrics": ["Recall", "NDCG"], "topk": [5, 10],
              "valid_metric": "NDCG@10", "epochs": 1, **overrides}
    return tiny_config(workdir, **values)


def end_to_end(workdir, **overrides):
    """Both tiers the tiny Llama, trained end to end."""
    llama = str(workdir / "llama")
    return hllm_config(workdir, hllm_item_llm=llama, hllm_user_llm=llama, hllm_freeze_item_llm=False,
                       hllm_item_num_layers=None, hllm_user_num_layers=None, **overrides)


def build(config_dict, seed=2020):
    """(model, config, train, valid, test)."""
    config = Config(config_dict=config_dict)
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(seed, True)
    return HLLM(config, train.dataset), config, train, valid, test


@pytest.fixture(scope="module")
def frozen(workdir):
    return build(hllm_config(workdir))


@pytest.fixture(scope="module")
def e2e(workdir):
    return build(end_to_end(workdir))


# --- item texts and tokens ----------------------------------------------------------------------------------------

def text_config(folder, fields=None):
    return {"data_path": str(folder), "dataset": "test", "field_separator": "\t", "encoding": None,
            "ITEM_ID_FIELD": "item_id", "hllm_text_fields": fields, "hllm_item_prompt": PROMPT}


def test_item_text_is_the_prompt_then_non_empty_fields_without_separator(frozen, tmp_path):
    _, config, train, _, _ = frozen
    dataset, item = train.dataset, train.dataset.token2id("item_id", "61")
    texts = item_texts(text_config(config["data_path"]), dataset)
    assert texts[0] == "" and texts[item] == PROMPT + "movie_title: Three Colors: Whiterelease_year: 1994class: Drama"
    assert item_texts(text_config(config["data_path"], ["class", "movie_title"]), dataset)[item] == \
        PROMPT + "class: Dramamovie_title: Three Colors: White"
    source = Path(config["data_path"]) / "test.item"
    (tmp_path / "test.item").write_text(source.read_text().replace("White\t1994\t", "White\t\t"))
    assert item_texts(text_config(tmp_path), dataset)[item] == PROMPT + "movie_title: Three Colors: Whiteclass: Drama"


def test_tokens_are_cut_and_right_aligned_before_the_item_token():
    tokenizer = AutoTokenizer.from_pretrained(encoder_path({"llm_encoder": None}))
    ids, mask = item_token_table(["a b", "a b c d e f g h"], tokenizer, max_length=6, n_item_tokens=1)
    assert ids.shape == mask.shape == (2, 7)
    assert mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1]  # [CLS] a b [SEP] at positions 2..5, [ITEM] at 6
    assert mask[1].tolist() == [1] * 7  # cut to 6 tokens
    assert ids[1, :6].tolist() == tokenizer.encode("a b c d e f g h")[:6] and ids[:, -1].tolist() == [0, 0]


def test_llama_item_tokens_start_with_one_bos_and_need_no_pad_token(workdir):
    tokenizer = AutoTokenizer.from_pretrained(workdir / "llama")
    assert tokenizer.pad_token is None
    texts = ["", PROMPT + "title: Heat", PROMPT + "title: Heat" * 20]  # [PAD]'s empty text, a short, a long one
    ids, mask = item_token_table(texts, tokenizer, max_length=32, n_item_tokens=1)
    for row, text in enumerate(texts):
        tokens = tokenizer.encode(text)[:32]
        assert tokens[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in tokens[1:]
        assert ids[row, 32 - len(tokens):32].tolist() == tokens
        assert mask[row].tolist() == [0] * (32 - len(tokens)) + [1] * (len(tokens) + 1)
    assert mask.sum(1).tolist() == [2, len(tokenizer.encode(texts[1])) + 1, 33]


def test_llama_item_token_sits_at_position_max_length_alone_or_beside_a_longer_text(e2e):
    """[PAD]'s text is the BOS alone; beside a full-length text, or alone (its padding columns cut), the BOS
    keeps position max_length - 1 and the [ITEM] vector position max_length, and its item vector is the same."""
    item_llm = e2e[0].item_llm
    width = e2e[1]["hllm_max_text_length"]
    seen = []
    hook = item_llm.llm.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        pair, alone = item_llm(torch.tensor([0, 1])), item_llm(torch.tensor([0]))
    hook.remove()
    (pair_positions, pair_mask), (alone_positions, _) = [(k["position_ids"], k["attention_mask"]) for k in seen]
    assert pair_mask[0].tolist() == [0] * (width - 1) + [1, 1] and pair_mask[1].all()
    assert pair_positions[0, -2:].tolist() == alone_positions[0].tolist() == [width - 1, width]
    assert torch.equal(seen[0]["inputs_embeds"][:, -1], item_llm.item_token.expand(2, -1))
    torch.testing.assert_close(pair[0], alone[0], atol=1e-5, rtol=1e-5)


# --- gradients ----------------------------------------------------------------------------------------------------

def test_item_vector_and_item_llm_get_gradients_end_to_end(e2e):
    model, _, train, _, _ = e2e
    model.train()
    model.zero_grad()
    model.calculate_loss(next(iter(train))).backward()
    assert model.item_text == "prompt"  # auto's choice end to end
    assert model.item_llm.item_token.grad.norm() > 0
    assert model.item_llm.llm.layers[0].self_attn.q_proj.weight.grad.norm() > 0
    assert model.logit_scale.grad is not None


def test_gradient_checkpointing_leaves_both_llms_gradients_unchanged(workdir):
    model, _, train, _, _ = build(end_to_end(workdir))
    batch = next(iter(train))
    plain, checkpointed = checkpointing_gradients(model, lambda: model.calculate_loss(batch))  # same negatives
    assert is_checkpointing(model.user_llm) and is_checkpointing(model.item_llm.llm)
    assert plain.keys() == checkpointed.keys() and any(name.startswith("item_llm.llm.") for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_micro_batched_item_pass_gives_the_vectors_and_gradients_of_one_pass(e2e):
    model = e2e[0]
    model.eval()  # no dropout: both passes see the same network
    items = torch.arange(1, 40).repeat(2)  # repeats are encoded once
    weights = torch.randn(len(items), model.item_llm.dim, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = model.item_llm.register_forward_hook(lambda *args: calls.append(1))

    def pass_with(micro_batch):
        model.item_micro_batch, calls[:] = micro_batch, []
        model.zero_grad()
        vectors = model.item_vectors(items)
        (vectors * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.item_llm.named_parameters() if p.grad is not None}
        return vectors.detach(), grads, len(calls)

    try:
        whole, whole_grads, whole_calls = pass_with(None)
        micro, micro_grads, micro_calls = pass_with(7)
    finally:
        hook.remove()
        model.item_micro_batch = None
        model.zero_grad()
    assert (whole_calls, micro_calls) == (1, math.ceil(39 / 7))
    assert torch.allclose(micro, whole, atol=1e-5)
    assert "item_token" in whole_grads and whole_grads.keys() == micro_grads.keys()
    for name, grad in whole_grads.items():  # equal up to the order of float32 sums over the items
        torch.testing.assert_close(micro_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())


@pytest.mark.parametrize("family", ["llama", "minilm"])
def test_top_layers_over_kept_lower_states_train_only_the_top_and_reload(workdir, family):
    """hllm_item_trainable_layers 1: the item vectors start equal to the whole item LLM's where the text cannot see
    [ITEM] anyway (a causal Llama); only the top layer and the [ITEM] shift train; a reload at another seed, which
    rebuilds the kept states, gives the trained vectors back."""
    def config(**overrides):
        if family == "llama":  # 2 layers
            return end_to_end(workdir, **overrides)
        return hllm_config(workdir, hllm_freeze_item_llm=False, hllm_item_num_layers=3, **overrides)

    whole = build(config())[0].eval()
    top, _, train, _, test = build(config(hllm_item_trainable_layers=1))
    items = torch.arange(1, 40)
    with torch.no_grad():
        start, reference = top.eval().item_llm.encode(items), whole.item_llm.encode(items)
    if family == "llama":
        torch.testing.assert_close(start, reference, atol=1e-5, rtol=0)
    else:  # the encoder's text attended to [ITEM] in the layers below; now it does not
        assert 0.9 < F.cosine_similarity(start, reference).min() < 1 - 1e-4
    layers = {match[1] for name, _ in top.item_llm.named_parameters() if (match := re.search(r"layers?\.(\d+)\.", name))}
    assert layers == {"0"} and "item_llm.lower_states" not in top.state_dict()
    assert "item_llm.item_slot_states" in top.state_dict()  # the initial [ITEM] vector is random
    assert top.item_llm.lower_states.shape == (*top.item_llm.token_ids.shape, top.item_llm.dim)
    top.train()
    top.calculate_loss(next(iter(train))).backward()
    trained = {name for name, p in top.item_llm.named_parameters() if p.grad is not None and p.grad.norm() > 0}
    assert "item_shift" in trained and any(".0." in name for name in trained)
    assert not any("embed" in name for name in trained)
    with torch.no_grad():
        for parameter in top.item_llm.parameters():
            if parameter.grad is not None:
                parameter -= 0.1 * parameter.grad
    batch = next(iter(train))
    plain, checkpointed = checkpointing_gradients(top, lambda: top.calculate_loss(batch))
    assert is_checkpointing(top.item_llm.llm) and "item_llm.item_shift" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    reloaded = build(config(hllm_item_trainable_layers=1), seed=7)[0]
    reloaded.load_state_dict(top.state_dict())
    with torch.no_grad():
        moved = top.eval().item_llm.encode(items)
        assert not torch.allclose(moved, whole.item_llm.encode(items), atol=1e-4)
        torch.testing.assert_close(reloaded.eval().item_llm.encode(items), moved)


def test_frozen_mode_trains_the_user_side_and_the_item_adapter_but_not_the_table(frozen):
    model, _, train, _, _ = frozen
    assert not hasattr(model, "item_llm") and "item_table" in dict(model.named_buffers())
    table = model.item_table.clone()
    model.train()
    model.zero_grad()
    model.calculate_loss(next(iter(train))).backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {"item_to_user", "user_llm", "user_to_item", "logit_scale", "item_adapter"}  # auto: 1536 wide
    assert torch.equal(model.item_table, table)


def test_frozen_table_is_read_back_from_the_cache(workdir, frozen, monkeypatch):
    monkeypatch.setattr(hllm_layers.ItemLLM, "encode_all", lambda self: pytest.fail("the items were encoded again"))
    again = build(hllm_config(workdir))[0]
    assert torch.equal(again.item_table, frozen[0].item_table)
    other = hllm_config(workdir, hllm_max_text_length=12)  # another token table: another fingerprint
    with pytest.raises(pytest.fail.Exception, match="encoded again"):
        build(other)


def test_side_data_rows_are_the_cache_vectors_by_internal_id_without_a_second_encoder_pass(workdir, monkeypatch):
    # the whole MiniLM: auto picks side_data; unwhitened, so that the rows are the cache's own
    config_dict = hllm_config(workdir, hllm_item_num_layers=None, hllm_item_whiten=False)
    config = Config(config_dict=config_dict)
    dataset = create_dataset(config)
    item_vectors(dataset, config)  # the cache filled as an LLM-ESR model fills it
    monkeypatch.setattr(TextEncoder, "encode", lambda *args: pytest.fail("the items were encoded again"))
    monkeypatch.setattr("recbole_llm.model.sequential_recommender.hllm.ItemLLM",
                        lambda *args: pytest.fail("the item LLM was built"))
    model, _, train, _, _ = build(config_dict)
    assert model.item_text == "side_data"
    cached = SideData(config).items()
    internal = train.dataset.token2id("item_id", "61")
    assert internal != 61  # RecBole remapped the ids
    assert torch.equal(model.item_table[internal], torch.from_numpy(cached.matrix[cached.tokens.index("61")]))
    assert SideData(config).item_texts.texts["61"] == "Three Colors: White (1994). Genres: Drama."
    assert model.item_table.shape == (model.n_items, 384) and not model.item_table[0].any()


def test_whitened_table_is_the_side_data_table_whitened_and_spreads_the_cosines(workdir):
    config_dict = hllm_config(workdir, hllm_item_num_layers=None)  # side_data rows
    plain, *_ = build({**config_dict, "hllm_item_whiten": False})
    white, _, train, _, _ = build(config_dict)  # auto: whitened, as the table is frozen
    assert torch.allclose(white.item_table, whitened(plain.item_table))
    assert not white.item_table[0].any()  # the [PAD] row stays zero
    def mean_cosine(table):
        unit = F.normalize(table[1:], dim=-1)
        n = len(unit)
        return ((unit @ unit.T).sum() - n) / (n * (n - 1))
    assert mean_cosine(plain.item_table) > 0.1 > abs(mean_cosine(white.item_table))
    loss = white.calculate_loss(next(iter(train)))
    loss.backward()
    assert torch.isfinite(loss) and white.item_adapter.out.weight.grad.abs().sum() > 0


def test_user_dropout_acts_in_training_only_and_reaches_the_attention(workdir):
    model, _, train, _, _ = build(hllm_config(workdir, hllm_freeze_item_llm=True, hllm_user_dropout=0.5))
    assert model.user_llm.config.attention_dropout == 0.5
    rows = next(iter(train))
    seq, lengths = rows["item_id_list"], rows["item_length"]
    model.train()
    assert not torch.allclose(model.forward(seq, lengths), model.forward(seq, lengths))
    model.eval()
    assert torch.equal(model.forward(seq, lengths), model.forward(seq, lengths))
    plain, *_ = build(hllm_config(workdir, hllm_freeze_item_llm=True))  # 0, the official model: no dropout
    plain.train()
    assert plain.user_llm.config.attention_dropout == 0.0
    assert torch.equal(plain.forward(seq, lengths), plain.forward(seq, lengths))
    loaded, *_ = build(end_to_end(workdir, hllm_user_dropout=0.3))  # a user LLM from a folder gets it too
    assert loaded.user_llm.config.attention_dropout == 0.3


def test_auto_loss_and_dropout_are_the_softmax_and_dropout_over_a_frozen_table_and_official_end_to_end(workdir):
    auto = {"hllm_loss": "auto", "hllm_user_dropout": "auto"}
    frozen_model, *_ = build(hllm_config(workdir, **auto))
    assert frozen_model.softmax and frozen_model.user_input_dropout.p == 0.2
    assert frozen_model.user_llm.config.attention_dropout == 0.2
    trained, *_ = build(end_to_end(workdir, **auto))
    assert not trained.softmax and trained.user_input_dropout.p == 0.0
    assert trained.user_llm.config.attention_dropout == 0.0


# --- the loss -----------------------------------------------------------------------------------------------------

def test_false_negative_mask_removes_exactly_the_near_duplicates():
    positive = torch.tensor([[1.0, 0.0]])
    angles = torch.tensor([0.0, math.acos(0.995), math.acos(0.985), math.pi / 2])  # cosines 1, .995, .985, 0
    negatives = torch.stack([angles.cos(), angles.sin()], dim=1)
    logits = nce_logits(torch.tensor([[0.6, 0.8]]), positive, negatives, torch.tensor(0.0), 0.99)
    assert torch.isinf(logits[0]).tolist() == [False, True, True, False, False]


def test_loss_equals_a_hand_computation():
    outputs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    negatives = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])  # the last duplicates row 2's positive
    scale = 1 / 0.07
    hand = []
    for out, pos in zip(outputs, positives):
        cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
        logits = [cos(out, pos)] + [cos(out, neg) for neg in negatives if cos(pos, neg) <= 0.99]
        hand.append(-math.log(math.exp(scale * logits[0]) / sum(math.exp(scale * x) for x in logits)))
    loss = nce_loss(outputs, positives, negatives, torch.tensor(math.log(scale)), 0.99)
    assert loss.item() == pytest.approx(sum(hand) / 2, rel=1e-5)


def test_softmax_loss_equals_a_hand_computation_and_pad_takes_no_probability():
    outputs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    items = torch.tensor([[5.0, 5.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])  # row 0 is [PAD], aligned with both
    targets = torch.tensor([1, 3])
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    hand = [-10 * cos(out, items[t]) + math.log(sum(math.exp(10 * cos(out, item)) for item in items[1:]))
            for out, t in zip(outputs, targets)]
    loss = softmax_loss(outputs, targets, items, scale)
    assert loss.item() == pytest.approx(sum(hand) / 2, rel=1e-5)
    assert torch.isneginf(softmax_logits(outputs, items, scale)[:, 0]).all()
    loss.backward()
    assert torch.isfinite(scale.grad)


def test_softmax_mode_scores_the_targets_against_the_whole_table_and_draws_no_negatives(frozen, monkeypatch):
    model, _, train, _, _ = frozen
    seen = {}

    def recording(outputs, targets, items, logit_scale):
        seen.update(targets=targets, items=items)
        return softmax_loss(outputs, targets, items, logit_scale)

    monkeypatch.setattr("recbole_llm.model.sequential_recommender.hllm.softmax_loss", recording)
    monkeypatch.setattr("recbole_llm.model.sequential_recommender.hllm.nce_loss",
                        lambda *args: pytest.fail("InfoNCE was computed"))
    draw = hllm_layers.uniform_items
    monkeypatch.setattr("recbole_llm.model.sequential_recommender.hllm.uniform_items",
                        lambda count, *args: seen.update(negatives=count) or draw(count, *args))
    monkeypatch.setattr(model, "softmax", True)
    batch = next(iter(train))
    model.calculate_loss(batch)
    targets = batch["item_id_target_list"]
    assert torch.equal(seen["targets"], targets[targets > 0])
    assert torch.allclose(seen["items"], model.item_adapter(model.item_table))  # every item, through the adapter
    assert seen["negatives"] == 0


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100(frozen):
    model, _, train, _, _ = frozen
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.calculate_loss(next(iter(train)))
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))


def test_negatives_are_uniform_and_shared_by_all_positions(frozen, monkeypatch):
    model, _, train, _, _ = frozen
    seen = {}

    def recording(outputs, positives, negatives, *args):
        seen.update(outputs=outputs.shape, negatives=negatives.shape)
        return nce_loss(outputs, positives, negatives, *args)

    monkeypatch.setattr("recbole_llm.model.sequential_recommender.hllm.nce_loss", recording)
    batch = next(iter(train))
    model.calculate_loss(batch)
    assert seen["negatives"] == (32, model.item_table.size(1))
    assert seen["outputs"][0] == int((batch["item_id_target_list"] > 0).sum())
    draws = hllm_layers.uniform_items(20_000, model.n_items, torch.device("cpu"))
    assert set(draws.tolist()) == set(range(1, model.n_items))


def test_negatives_are_gathered_across_ranks_with_gradients():
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(gather_on_rank, args=(free_port(), queue), nprocs=2, join=True)
    results = dict((rank, (gathered, grad)) for rank, gathered, grad in (queue.get(), queue.get()))
    expected = [[1.0] * 3, [1.0] * 3, [2.0] * 3, [2.0] * 3]
    assert results[0][0] == results[1][0] == expected
    # Each rank's own rows get the gradient of both ranks' losses (2 x their weights).
    assert results[0][1] == [0.0, 2.0] and results[1][1] == [4.0, 6.0]


# --- evaluation cache and checkpoints -----------------------------------------------------------------------------

def test_item_cache_is_reused_and_invalidated_when_the_item_llm_changes(e2e):
    model, _, _, _, test = e2e
    model.eval()
    batch = next(iter(test))[0]
    with torch.no_grad():
        first = model.full_sort_predict(batch)
        cached = model._eval_items
        assert torch.equal(model.full_sort_predict(batch), first) and model._eval_items is cached
        optimizer = torch.optim.SGD(model.item_llm.parameters(), lr=1.0)
        model.item_llm.item_token.grad = torch.ones_like(model.item_llm.item_token)
        optimizer.step()  # an in-place update of the [ITEM] vector
        changed = model.full_sort_predict(batch)
    assert model._eval_items is not cached and not torch.allclose(changed, first)
    assert torch.allclose(model._eval_items, model.item_llm.encode_all())


def test_full_sort_predict_is_the_cosine_with_every_item(frozen):
    model, _, _, _, test = frozen
    model.eval()
    batch = next(iter(test))[0]
    with torch.no_grad():
        users = model.forward(batch["item_id_list"], batch["item_length"])
        scores = model.full_sort_predict(batch)
        hand = F.cosine_similarity(users[:, None], model.item_table[None], dim=-1)
    assert torch.allclose(scores, hand, atol=1e-5)


def test_state_dict_reload_reproduces_end_to_end_scores(workdir, e2e):
    model, config, _, _, test = e2e
    other = HLLM(config, test.dataset)  # another random [ITEM] vector, logit scale and user LLM state
    batch = next(iter(test))[0]
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(other.full_sort_predict(batch), model.full_sort_predict(batch))


def test_checkpoint_reload_reproduces_the_test_result(workdir):
    result = run_recbole_llm(config_dict=hllm_config(workdir), saved=True)
    config, model, dataset, _, valid, test = load_data_and_model(result["saved_model_file"])
    trainer = _build_trainer(config, model, dataset, valid, test)  # with the group metrics, as the run had
    assert trainer.evaluate(test, load_best_model=False) == result["test_result"]


# --- the item adapter (a deviation) ------------------------------------------------------------------------------

def test_item_adapter_starts_at_the_frozen_vectors_then_moves_them_while_the_table_stays(workdir):
    plain = build(hllm_config(workdir, hllm_item_adapter=0))[0]
    assert plain.item_adapter is None
    adapted, _, train, _, test = build(hllm_config(workdir, hllm_item_adapter=8))
    missing = adapted.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("item_adapter.") for key in missing)
    plain.eval(), adapted.eval()
    batch = next(iter(test))[0]
    with torch.no_grad():
        assert torch.allclose(adapted.full_sort_predict(batch), plain.full_sort_predict(batch), atol=1e-6)
    table = adapted.item_table.clone()
    adapted.train()
    optimizer = torch.optim.SGD(adapted.item_adapter.parameters(), lr=0.5)
    adapted.calculate_loss(next(iter(train))).backward()
    moved = {name for name, p in adapted.named_parameters() if p.grad is not None and p.grad.any()}
    assert {"item_adapter.out.weight", "item_adapter.out.bias"} <= moved  # the zero output layer learns first
    optimizer.step()
    assert torch.equal(adapted.item_table, table)
    with torch.no_grad():
        vectors = adapted.all_item_vectors()
        items = torch.tensor([[3, 1], [3, 5]])
        assert not torch.allclose(vectors, table)
        assert torch.allclose(adapted.item_vectors(items), vectors[items], atol=1e-6)


def test_item_adapter_auto_is_1536_wide_over_a_frozen_table_and_absent_end_to_end(workdir):
    values = {key: value for key, value in hllm_config(workdir).items() if key != "hllm_num_negatives"}
    default = Config(config_dict=values)
    assert default["hllm_item_adapter"] == "auto" and default["hllm_num_negatives"] == 2048  # the YAML's defaults
    assert item_adapter_size(default) == 1536
    assert item_adapter_size(Config(config_dict=hllm_config(workdir, hllm_item_adapter=0))) == 0
    model = build(end_to_end(workdir))[0]
    assert model.item_adapter is None
    assert not any(name.startswith("item_adapter.") for name in model.state_dict())


def test_evaluation_runs_the_item_adapter_once_per_weight_state(workdir):
    model, _, _, _, test = build(hllm_config(workdir, hllm_item_adapter=8))
    calls = []
    model.item_adapter.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
    model.eval()
    batch = next(iter(test))[0]
    with torch.no_grad():
        first = model.full_sort_predict(batch)
        assert torch.equal(model.full_sort_predict(batch), first)
        assert calls == [model.n_items]  # one pass over the table for two batches' histories and scores
        model.item_adapter.out.bias += 1.0  # an in-place update, as an optimizer step makes
        changed = model.full_sort_predict(batch)
    assert calls == [model.n_items] * 2 and not torch.allclose(changed, first)
    assert torch.allclose(model._eval_items, model.item_adapter(model.item_table), atol=1e-6)
    model.train()
    assert model.all_item_vectors().requires_grad  # training reads the adapter with gradients, not the cache

# --- training -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"hllm_loss": "softmax", "hllm_item_num_layers": None},
                                       {"hllm_loss": "softmax", "hllm_item_num_layers": None, "hllm_item_adapter": 16}],
                         ids=["nce-prompt", "softmax-side_data", "softmax-side_data-adapter"])
def test_loss_goes_down_on_a_tiny_dataset(workdir, overrides):
    model, config, train, _, _ = build(hllm_config(workdir, learning_rate=0.01, **overrides))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    losses = [trainer._train_epoch(train, epoch, show_progress=False) for epoch in range(4)]
    assert losses[-1] < losses[0]


def test_prefix_mode_and_no_projection_between_equal_widths(workdir):
    model, _, train, _, _ = build(hllm_config(workdir, llm_train_mode="prefix", hllm_user_hidden_size=None,
                                              hllm_user_inner_size=64))
    assert isinstance(model.item_to_user, torch.nn.Identity) and model.user_llm.config.hidden_size == 384
    assert torch.isfinite(model.calculate_loss(next(iter(train))))


def test_a_projection_maps_between_different_widths(frozen):
    model = frozen[0]
    assert model.item_to_user.weight.shape == (16, 384) and model.user_to_item.weight.shape == (384, 16)


def test_late_fusion_keeps_the_item_states_and_trains_the_user_vector_and_the_head(workdir):
    model, _, train, _, test = build(hllm_config(workdir, hllm_head="late_fusion", hllm_head_hidden_size=8))
    batch = next(iter(train))
    seq = batch["item_id_list"]
    model.eval()
    with torch.no_grad():
        fused = model.user_states(seq, model.item_table[seq])
        model.late_fusion = False
        plain = model.user_states(seq, model.item_table[seq])
        model.late_fusion = True
    items = seq > 0  # padding positions may see [USER]; their states are never used
    assert fused.shape[1] == seq.size(1) + 1 and torch.allclose(fused[:, :-1][items], plain[items], atol=1e-5)
    model.train()
    model.calculate_loss(batch).backward()
    assert model.user_token.grad.norm() > 0 and model.fusion.item_in.weight.grad.norm() > 0
    model.eval()
    rows = next(iter(test))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(rows)
        users = model.forward(rows["item_id_list"], rows["item_length"])
        pairs = model.fusion(users[:3].repeat_interleave(5, 0), model.item_table[1:6].repeat(3, 1)).view(3, 5)
    assert torch.allclose(scores[:3, 1:6], pairs, atol=1e-5)


# --- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"hllm_head": "early_fusion"}, r"hllm_head 'early_fusion' is unknown; use one of generative, late_fusion"),
    ({"hllm_item_pooling": "cls"}, r"hllm_item_pooling 'cls' is unknown; use one of auto, item, mean"),
    ({"hllm_text_fields": ["title"]}, r"hllm_text_fields names title, which .*test.item lacks"),
    ({"hllm_user_llm": "MINILM"}, r"hllm_user_llm '.*' is not a decoder-only \(causal\) model"),
    ({"hllm_item_num_layers": 9}, r"hllm_item_llm '.*' has 6 layers; set hllm_item_num_layers to 1..6"),
    ({"hllm_max_text_length": 512}, r"hllm_max_text_length 512 leaves no room for the \[ITEM\] position"),
    ({"hllm_user_num_heads": 5}, r"width divisible by hllm_user_num_heads"),
    ({"hllm_item_llm": "no/such/folder"}, r"hllm_item_llm 'no/such/folder' does not exist"),
    ({"hllm_item_text": "title"}, r"hllm_item_text 'title' is unknown; use one of auto, side_data, prompt"),
    ({"hllm_item_text": "side_data"}, r"side_data reads fixed vectors .* set hllm_freeze_item_llm: True"),
    ({"hllm_item_text": "side_data", "hllm_freeze_item_llm": True},
     r"side_data takes the vectors of llm_encoder, unchanged, but hllm_item_num_layers keeps 1 of its layers"),
    ({"hllm_item_text": "side_data", "hllm_freeze_item_llm": True, "hllm_item_num_layers": None,
      "llm_encoder": "LLAMA"},
     r"side_data takes the vectors of llm_encoder, unchanged, but hllm_item_llm is '.*' and llm_encoder '.*llama'"),
    ({"hllm_loss": "bpr"}, r"hllm_loss 'bpr' is unknown; use one of auto, nce, softmax"),
    ({"hllm_loss": "softmax"}, r"hllm_loss: softmax .* needs the frozen item table \(hllm_freeze_item_llm: True\)"),
    ({"hllm_item_micro_batch": 0}, r"hllm_item_micro_batch must be a positive number of items or ~"),
    ({"hllm_item_trainable_layers": 1, "hllm_freeze_item_llm": True},
     r"hllm_item_trainable_layers trains the item LLM's top layers end to end; with hllm_freeze_item_llm: True"),
    ({"hllm_item_trainable_layers": 1}, r"hllm_item_trainable_layers must be 1..0 \(the item LLM has 1 layers\)"),
    ({"hllm_item_trainable_layers": 1, "hllm_item_num_layers": 2, "hllm_item_llm_pretrained": False},
     r"hllm_item_trainable_layers keeps the layers below the top ones frozen, which with hllm_item_llm_pretrained"),
    ({"hllm_item_adapter": 8}, r"hllm_item_adapter trains a head over the frozen item table"),
    ({"hllm_item_adapter": -1, "hllm_freeze_item_llm": True}, r"hllm_item_adapter must be a hidden width"),
    ({"hllm_item_adapter": "wide", "hllm_freeze_item_llm": True}, r"hllm_item_adapter must be .* or auto, not 'wide'"),
    ({"hllm_item_whiten": True}, r"hllm_item_whiten whitens the frozen item table"),
    ({"hllm_item_whiten": "pca", "hllm_freeze_item_llm": True}, r"hllm_item_whiten must be True, False or auto"),
    ({"hllm_user_dropout": 1.0}, r"hllm_user_dropout must be a probability in \[0, 1\) or auto, not 1.0"),
    ({"hllm_user_llm": "GPT2", "hllm_user_dropout": 0.1}, r"hllm_user_dropout needs a user LLM whose config has "
                                                          r"attention_dropout; hllm_user_llm '.*' \(gpt2\)"),
])
def test_clear_errors(workdir, overrides, message):
    named = {"MINILM": str(encoder_path({"llm_encoder": None})), "LLAMA": str(workdir / "llama"),
             "GPT2": str(workdir / "gpt2")}
    overrides = {key: named.get(value, value) if isinstance(value, str) else value for key, value in overrides.items()}
    with pytest.raises(RecBoleLLMError, match=message):
        build(hllm_config(workdir, **{"hllm_freeze_item_llm": False, **overrides}))


def test_end_to_end_cpu_preset_sets_declared_keys_of_the_right_type(workdir):
    """Config files are not checked against the property files, so a misspelt key in the preset would do nothing."""
    import yaml

    preset = Path(__file__).resolve().parents[1] / "benchmarks" / "protocols" / "hllm_end_to_end_cpu.yaml"
    keys = yaml.safe_load(preset.read_text(encoding="utf-8"))
    config = Config(model="HLLM", dataset="test", config_file_list=[str(preset)],
                    config_dict={k: v for k, v in hllm_config(workdir).items() if k not in keys})
    assert set(keys) <= set(config.key_types)  # the keys the property files declare
    assert {key: config[key] for key in keys} == {"hllm_freeze_item_llm": False, "hllm_item_num_layers": 2,
                                                   "llm_gradient_checkpointing": True, "hllm_item_micro_batch": 256}
