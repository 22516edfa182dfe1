"""RecLoRA: ReLLa's CTR samples and prompt, the meta-LoRA bank, P(yes), the CRM and Few2Many, on hand-made data."""
import math
import os

import pytest
import torch

from conftest import checkpointing_gradients, is_checkpointing
from llama_fixture import save_tiny_llama
from recbole_llm.data.ctr import ANSWERS, CTRPrompts, render_prompt, rella_split_counts
from recbole_llm.model.layers import MetaLoRA
from recbole_llm.utils import RecBoleLLMError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TITLES = {  # item -> (title, year); item 10 has an apostrophe, so Python's list repr quotes it with "
    1: ("Toy Story", 1995), 2: ("Jumanji", 1995), 3: ("Grumpier Old Men", 1995), 4: ("Waiting to Exhale", 1995),
    5: ("Father of the Bride Part II", 1995), 6: ("Heat", 1995), 7: ("Sabrina", 1995), 8: ("Tom and Huck", 1995),
    9: ("Sudden Death", 1995), 10: ("Schindler's List", 1993), 11: ("American President, The", 1995),
    12: ("Dracula: Dead and Loving It", 1995), 13: ("Balto", 1995), 14: ("Nixon", 1995),
    15: ("Cutthroat Island", 1995),
}
USERS = {"1": ("25", "M", "12"), "2": ("1", "F", "10"), "10": ("35", "M", "20"), "3": ("56", "F", "0")}
BASE = 978300000
# user -> [(item, rating, seconds after BASE)]. u10 shares u2's timestamps (ReLLa's string order puts "10" first),
# and u10's last rating (2401) is one second after u1's last (2400): float32 cannot tell them apart.
HISTORIES = {
    "10": list(zip(range(2, 13), [4, 2, 5, 3, 1, 4, 5, 2, 1, 5, 3], list(range(100, 2000, 200)) + [2401])),
    "1": list(zip(range(1, 15), [5, 3, 4, 1, 2, 5, 4, 3, 4, 5, 2, 1, 4, 2], list(range(0, 2500, 200)) + [2450])),
    "2": list(zip(range(5, 16), [2, 4, 4, 5, 1, 3, 4, 2, 5, 4, 5], list(range(100, 2000, 200)) + [2300])),
    "3": list(zip(range(1, 5), [5, 5, 4, 3], range(2600, 3000, 100))),
}
# Hand count: a sample needs >= 5 earlier ratings of its user: u1 14 - 5 = 9, u2 11 - 5 = 6, u10 11 - 5 = 6, u3 0.
# 21 samples: train int(0.8 * 21) = 16, valid int(0.1 * 21) = 2, test 3 (RecBole's own rounding: 17 / 2 / 2).
# In time order the last five are u1 at 2200 and u2 at 2300 (valid), then u1 at 2400, u10 at 2401, u1 at 2450.
EXPECTED_TEST = [("1", "13", 12), ("10", "12", 10), ("1", "14", 13)]  # (user, item, earlier ratings)

EXPECTED_PROMPT = (  # u10's test sample, K = 3 most recent, written out by hand
    "The user is a male. His job is writer. His age is 35-44.\n"
    "He watched the following movies in order in the past, and rated them:\n"
    "['0. Sudden Death (1995) (2 stars)', \"1. Schindler's List (1993) (1 star)\", "
    "'2. American President, The (1995) (5 stars)']\n"
    "Based on the movies he has watched, deduce if he will like the movie ***Dracula: Dead and Loving It (1995)***.\n"
    "Note that more stars the user rated the movie, the user liked the movie more.\n"
    "You should ONLY tell me yes or no."
)


def write_ctr_dataset(data_path, name="ctr"):
    folder = data_path / name
    folder.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"{u}\t{i}\t{r}\t{BASE + t}" for u, rows in HISTORIES.items() for i, r, t in rows]
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq"]
    items += [f"{i}\t{title}\t{year}\tDrama" for i, (title, year) in TITLES.items()]
    users = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    users += [f"{u}\t{a}\t{g}\t{o}\t0000{u}" for u, (a, g, o) in USERS.items()]
    for suffix, lines in (("inter", inter), ("item", items), ("user", users)):
        (folder / f"{name}.{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")


def ctr_config(root, **overrides):
    config = {
        "dataset": "ctr", "data_path": str(root / "data"), "checkpoint_dir": str(root / "saved"),
        "llm_dataset": "CTRDataset", "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None,
                                                   "mode": "labeled"},
        "metrics": ["AUC", "LogLoss"], "valid_metric": "AUC", "train_neg_sample_args": None,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                     "user": ["user_id", "age", "gender", "occupation", "zip_code"],
                     "item": ["item_id", "movie_title", "release_year", "genre"]},
        "reclora_crm_hist_len": 8, "embedding_size": 8, "mlp_hidden_size": [16, 8],
        "epochs": 1, "state": "ERROR", "show_progress": False, "use_gpu": False, "seed": 2020,
        "reproducibility": True, "train_batch_size": 4, "eval_batch_size": 8,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The fixture's data, a trained CRM (DIN), a tiny random Llama and a 1-layer MiniLM."""
    from recbole_llm.quick_start import objective_function

    root = tmp_path_factory.mktemp("reclora")
    write_ctr_dataset(root / "data")
    objective_function(ctr_config(root, model="DIN", checkpoint_dir=str(root / "crm")), saved=True)
    save_tiny_models(root)
    return root


def save_tiny_models(root):
    """A tiny random Llama with a Llama-2-style tokenizer, and MiniLM cut to one layer."""
    from transformers import AutoModel, AutoTokenizer

    from recbole_llm.text.encoders import encoder_path

    save_tiny_llama(root / "llama")
    minilm = encoder_path({"llm_encoder": None})
    AutoModel.from_pretrained(minilm, num_hidden_layers=1).save_pretrained(root / "minilm1")
    AutoTokenizer.from_pretrained(minilm).save_pretrained(root / "minilm1")


def crm_file(root):
    (path,) = (root / "crm").glob("DIN-*.pth")
    return str(path)


def reclora_config(root, llm="llama", **overrides):
    values = dict(model="RecLoRA", reclora_llm=str(root / llm), reclora_crm_checkpoint=crm_file(root),
                  reclora_llm_hist_len=3, reclora_n_meta=4, reclora_train_samples=10, reclora_crm_dim=8)
    return ctr_config(root, **{**values, **overrides})


def build(config_dict):
    """(config, train, valid, test) datasets of a config dict."""
    from recbole_llm.config import Config
    from recbole_llm.utils import create_dataset

    config = Config(config_dict=config_dict)
    return (config, *create_dataset(config).build())


def build_model(root, **overrides):
    from recbole_llm.model.context_aware_recommender import RecLoRA
    from recbole_llm.trainer.reclora import RecLoRATrainer

    config, train, valid, test = build(reclora_config(root, **overrides))
    torch.manual_seed(0)
    model = RecLoRA(config, train)
    return model, RecLoRATrainer(config, model), train, test


def raw(dataset, field, values):
    return [dataset.field2id_token[field][v] for v in values.tolist()]


# ---------------------------------------------------------------- data and prompt

def test_rella_split_counts_match_the_spec():
    assert rella_split_counts(970009, [0.8, 0.1, 0.1]) == [776007, 97000, 97002]


def test_ctr_samples_order_and_split(root):
    config, train, valid, test = build(ctr_config(root, model="DIN"))
    assert (len(train), len(valid), len(test)) == (16, 2, 3)
    inter = test.inter_feat
    got = list(zip(raw(test, "user_id", inter["user_id"]), raw(test, "item_id", inter["item_id"]),
                   inter["history_length"].tolist()))
    assert got == EXPECTED_TEST
    assert inter["label"].tolist() == [1.0, 0.0, 0.0]  # ratings 4, 3, 2: label = rating > 3
    # the CRM's window: the last 8 earlier items, oldest first
    assert raw(test, "item_id", inter["item_id_list"][1]) == [str(i) for i in range(4, 12)]
    assert inter["item_length"].tolist() == [8, 8, 8]
    assert raw(train, "user_id", train.inter_feat["user_id"][:3]) == ["1", "10", "2"]  # ties: "10" < "2"


def test_prompt_is_byte_exact(root):
    config, train, valid, test = build(ctr_config(root, model="RecLoRA", reclora_history="recent",
                                                  reclora_llm_hist_len=3))
    assert CTRPrompts(test, config).render(test.inter_feat[1:2]) == [EXPECTED_PROMPT]


def test_retrieved_history_keeps_history_order(root):
    config, train, valid, test = build(ctr_config(root, model="RecLoRA", reclora_history="recent",
                                                  reclora_llm_hist_len=2))
    prompts = CTRPrompts(test, config)
    prompts.mode, prompts.vectors = "retrieved", torch.eye(test.item_num).numpy()
    internal = {token: i for i, token in enumerate(test.field2id_token["item_id"])}
    prompts.vectors[internal["12"], internal["11"]] = 0.95  # the target (12) is most like 11, then 3
    prompts.vectors[internal["12"], internal["3"]] = 0.9
    prompts.vectors[internal["12"], internal["12"]] = 0.0
    history = [(f"{TITLES[i][0]} ({TITLES[i][1]})", s) for i, s in ((3, 2), (11, 5))]  # u10's ratings, history order
    expected = render_prompt("male", "writer", "35-44", history, "Dracula: Dead and Loving It (1995)", "retrieved")
    assert prompts.render(test.inter_feat[1:2]) == [expected]



def test_retrieval_reduces_only_vectors_wider_than_the_pca_dim(monkeypatch):
    import recbole_llm.text
    from recbole_llm.data.ctr import _retrieval_vectors

    vectors = torch.randn(16, 384)  # 16 items of MiniLM width
    reduced = []
    monkeypatch.setattr(recbole_llm.text, "item_vectors", lambda dataset, config: vectors)
    monkeypatch.setattr(recbole_llm.text, "pca_item_vectors",
                        lambda dataset, config, dim: reduced.append(dim) or vectors[:, :dim])
    unit = torch.nn.functional.normalize(vectors, dim=1).numpy()
    for dim in (512, 384, None):  # the official 512 and the width itself leave 384-d vectors as they are
        assert (_retrieval_vectors(None, {"reclora_pca_dim": dim}) == unit).all()
    assert reduced == []
    assert _retrieval_vectors(None, {"reclora_pca_dim": 4}).shape == (16, 4) and reduced == [4]
    with pytest.raises(RecBoleLLMError, match="reclora_pca_dim 20 is larger than the 16 items"):
        _retrieval_vectors(None, {"reclora_pca_dim": 20})

# ---------------------------------------------------------------- the meta-LoRA bank

class OneHot(torch.nn.Module):
    def __init__(self, n, k):
        super().__init__()
        self.weights = torch.nn.functional.one_hot(torch.tensor(k), n).float()

    def forward(self, context):
        return self.weights.expand(len(context), -1)


def test_one_hot_gate_gives_that_meta_lora():
    torch.manual_seed(0)
    bank = MetaLoRA(6, 5, rank=2, alpha=4, n_meta=3, gate=OneHot(3, 1))
    torch.nn.init.normal_(bank.lora_B)
    bank.context = torch.zeros(2, 7)
    x = torch.randn(2, 4, 6)
    assert torch.allclose(bank(x), x @ bank.lora_A[1] @ bank.lora_B[1] * 2.0, atol=1e-6)


def test_weight_space_mixing_per_sample():
    torch.manual_seed(0)
    gate = OneHot(2, 0)
    gate.weights = torch.tensor([0.25, 0.75])
    bank = MetaLoRA(3, 3, rank=1, alpha=1, n_meta=2, gate=gate)
    torch.nn.init.normal_(bank.lora_B)
    bank.context = torch.zeros(1, 1)
    x = torch.randn(1, 2, 3)
    a = 0.25 * bank.lora_A[0] + 0.75 * bank.lora_A[1]
    b = 0.25 * bank.lora_B[0] + 0.75 * bank.lora_B[1]
    assert torch.allclose(bank(x), x @ a @ b, atol=1e-6)


def test_p_yes_is_the_two_way_softmax():
    from recbole_llm.model.context_aware_recommender.reclora import p_yes

    logits = torch.randn(3, 10)
    answers = type("Answers", (), {"yes_id": 7, "no_id": 2})
    expected = logits[:, 7].exp() / (logits[:, 7].exp() + logits[:, 2].exp())
    assert torch.allclose(p_yes(logits, answers), expected)


# ---------------------------------------------------------------- the model on a tiny Llama

def test_zero_b_at_init_keeps_the_base_model(root):
    from transformers import AutoModelForCausalLM

    model, trainer, train, test = build_model(root)
    model.eval()
    base = AutoModelForCausalLM.from_pretrained(root / "llama").eval()
    texts = [model.wrap(p) for p in model.prompts.render(test.inter_feat)]
    input_ids, mask, _ = model._causal_batch(texts, [1, 1, 1])
    model._set_gate_context(test.inter_feat)
    with torch.no_grad():
        assert torch.allclose(model.llm(input_ids=input_ids, attention_mask=mask).logits,
                              base(input_ids=input_ids, attention_mask=mask).logits, atol=1e-5)


def test_the_tiny_llama_tokenizer_tokenizes_as_llama_2(root):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "llama")
    assert tokenizer.pad_token is None and tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tokenizer.tokenize("ASSISTANT: Yes.") == ["▁ASSISTANT", ":", "▁Yes", "."]
    assert tokenizer.convert_ids_to_tokens(tokenizer("No.\n")["input_ids"]) == ["<s>", "▁No", ".", "<0x0A>"]


def test_answer_ids_are_the_llama_yes_and_no_pieces(root):
    model, *_ = build_model(root)
    convert = model.tokenizer.convert_tokens_to_ids
    assert (model.answers.yes_id, model.answers.no_id) == (convert("▁Yes"), convert("▁No"))
    assert model.answers.suffix == {1: convert(["▁Yes", "."]), 0: convert(["▁No", "."])}


def test_prompt_and_answer_rows_hold_one_bos_at_their_start(root):
    """Each row is what the official code feeds: the tokenizer's own encoding of prompt + answer, BOS included
    once, left-padded."""
    model, trainer, train, test = build_model(root)
    texts = [model.wrap(p) for p in model.prompts.render(test.inter_feat)]
    labels = [1, 0, 1]
    input_ids, mask, suffix_lengths = model._causal_batch(texts, labels)
    assert len(set(mask.sum(1).tolist())) > 1  # rows of different lengths: the short ones are padded
    bos = model.tokenizer.bos_token_id
    for ids, row_mask, text, label in zip(input_ids, mask.bool(), texts, labels):
        row = ids[row_mask].tolist()
        assert row == model.tokenizer(text + ANSWERS[label])["input_ids"]
        assert row[0] == bos and row.count(bos) == 1 and row_mask[-len(row):].all()
    assert suffix_lengths.tolist() == [2, 2, 2]


def test_answer_logits_are_the_same_alone_and_left_padded_beside_a_longer_prompt(root):
    """The tokenizer has no pad token: the pads are masked and take no position, so a short prompt's logits at
    the answer position do not change when it is padded to a longer one's length."""
    model, trainer, train, test = build_model(root)
    with torch.no_grad():
        for bank in model.lora.values():  # B starts at zero; a non-zero LoRA must not mix the rows either
            bank.lora_B.normal_(0, 0.5)
    model.eval()
    lengths = [len(model.tokenizer(model.wrap(p))["input_ids"]) for p in model.prompts.render(test.inter_feat)]
    short = min(range(len(lengths)), key=lengths.__getitem__)
    assert lengths[short] < max(lengths)
    with torch.no_grad():
        batch, _ = model._answer_logits(test.inter_feat, [1, 1, 1])
        alone, _ = model._answer_logits(test.inter_feat[[short]], [1])
    torch.testing.assert_close(batch[short], alone[0], atol=1e-5, rtol=1e-5)


def test_only_bank_and_gates_get_gradients(root):
    model, trainer, train, test = build_model(root)
    model.train()
    model.calculate_loss(train.inter_feat[:4]).backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("lora.") for name in trainable)
    assert any(".gate." in name for name in trainable)
    assert all(p.grad is not None for name, p in model.named_parameters() if name in trainable and "lora_B" in name)
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
    assert all(p.grad is None for p in model.crm.parameters())
    assert set(model.state_dict()) == trainable


@pytest.mark.parametrize("mode,loss", [("reclora", "lm"), ("origin", "bce")])
def test_loss_goes_down(root, mode, loss):
    model, trainer, train, test = build_model(root, reclora_mode=mode, reclora_loss=loss)
    batch = train.inter_feat[:8]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss_value = model.calculate_loss(batch)
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("llm", ["llama", "minilm1"])
def test_end_to_end_run_reports_auc_and_logloss(root, llm):
    from recbole_llm.quick_start import objective_function

    result = objective_function(reclora_config(root, llm=llm, reclora_test_samples=2), saved=True)
    assert set(result["test_result"]) == {"auc", "logloss"}
    assert math.isfinite(result["test_result"]["logloss"])


def test_few_to_many_draws_a_fixed_subset(root):
    from recbole.data import data_preparation

    from recbole_llm.trainer.reclora import few_to_many

    config, train, valid, test = build(reclora_config(root))
    from recbole_llm.utils import create_dataset

    train_data, _, _ = data_preparation(config, create_dataset(config))
    first, second = (few_to_many(train_data, config)._dataset for _ in range(2))
    assert len(first) == 10 and torch.equal(first.inter_feat["timestamp"], second.inter_feat["timestamp"])


def test_linear_schedule_reaches_zero(root):
    model, trainer, train, test = build_model(root, learning_rate=0.01, llm_grad_accum_steps=1)
    trainer.start_schedule(range(4))  # one epoch of 4 batches: 4 optimizer steps
    rates = []
    for _ in range(4):
        trainer.optimizer.step()
        trainer.scheduler.step()
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.0075, 0.005, 0.0025, 0.0])


def test_gradient_checkpointing_leaves_the_gradients_unchanged(root):
    model, trainer, train, test = build_model(root, reclora_gate_dropout=0.0)
    batch = train.inter_feat[torch.arange(4)]
    plain, checkpointed = checkpointing_gradients(model, lambda: model.calculate_loss(batch))
    assert is_checkpointing(model.llm)
    assert plain.keys() == checkpointed.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- clear errors

def test_errors(root):
    with pytest.raises(RecBoleLLMError, match="reclora_crm_checkpoint"):
        build_model(root, reclora_crm_checkpoint=None)
    with pytest.raises(RecBoleLLMError, match="reclora_crm_checkpoint .* does not exist"):
        build_model(root, reclora_crm_checkpoint=str(root / "missing.pth"))
    with pytest.raises(RecBoleLLMError, match="reclora_min_history 5 .*here 4"):
        build_model(root, reclora_min_history=4)
    with pytest.raises(RecBoleLLMError, match="reclora_crm_dim: 8"):
        build_model(root, reclora_crm_dim=16)
    with pytest.raises(RecBoleLLMError, match="reclora_mode"):
        build_model(root, reclora_mode="moe")
    with pytest.raises(RecBoleLLMError, match="reclora_chat_template"):
        build_model(root, reclora_chat_template="no placeholder")
    with pytest.raises(RecBoleLLMError, match="reclora_target_modules"):
        build_model(root, reclora_target_modules=["nothing"])
    with pytest.raises(RecBoleLLMError, match="llm_dataset: CTRDataset"):
        from recbole_llm.model.context_aware_recommender import RecLoRA

        config, train, *_ = build(reclora_config(root, llm_dataset=None, eval_args={"split": {"LS": "valid_and_test"},
                                                                                    "order": "TO", "mode": "labeled"}))
        RecLoRA(config, train)
