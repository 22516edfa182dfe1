"""SLMRec: the frozen/trainable split, teacher and student, the distillation terms, truncation, checkpoints, FullMRR
and the errors. Backbones: all-MiniLM-L6-v2 cut to 1-2 layers, and a tiny random Llama built here."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recbole.data import data_preparation
from recbole.evaluator import Collector, Evaluator

from conftest import checkpointing_gradients, is_checkpointing, tiny_config, write_tiny_dataset
from llama_fixture import save_tiny_llama
from recbole_llm.config import Config
from recbole_llm.model.layer_stack import layer_list
from recbole_llm.model.sequential_recommender.slmrec import SLMRec, _checkpoint_item_vectors, kept_layers
from recbole_llm.quick_start import load_data_and_model, run
from recbole_llm.trainer.slmrec import SLMRecTrainer, cosine_distance, l2_distance
from recbole_llm.utils import RecBoleLLMError, create_dataset

SHORT_PROMPT = {"slmrec_instruction": "### Instruction:\nNext item?\n### Input:\n", "MAX_ITEM_LIST_LENGTH": 10,
                "slmrec_lora_r": 4, "slmrec_lora_alpha": 8, "train_batch_size": 8, "eval_batch_size": 64}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, SASRec checkpoint, train dataset, a training batch) shared by the tests."""
    folder = tmp_path_factory.mktemp("slmrec")
    write_tiny_dataset(folder / "data")
    sasrec = run("SASRecAP", "test", config_dict=tiny_config(folder, llm_checkpoint_name="sasrec.pth"))
    config = slmrec_config(folder, sasrec["saved_model_file"])
    train_data, _, _ = data_preparation(config, create_dataset(config))
    return folder, sasrec["saved_model_file"], train_data._dataset, next(iter(train_data))


def slmrec_values(folder, sasrec, **overrides):
    values = {**SHORT_PROMPT, "slmrec_item_emb_checkpoint": str(sasrec), "slmrec_n_layers": 1, **overrides}
    return tiny_config(folder, **values)


def slmrec_config(folder, sasrec, **overrides):
    return Config(model="SLMRec", config_dict=slmrec_values(folder, sasrec, **overrides))


def configured(setup, **overrides):
    """(config, SLMRec) on the shared dataset."""
    folder, sasrec, dataset, _ = setup
    config = slmrec_config(folder, sasrec, **overrides)
    torch.manual_seed(0)
    return config, SLMRec(config, dataset)


def build(setup, **overrides):
    return configured(setup, **overrides)[1]


def save_checkpoint(setup, path, perturb=False, **overrides):
    """The path of a checkpoint of an SLMRec built with ``overrides``, as RecBole's trainer saves one."""
    config, model = configured(setup, **overrides)
    if perturb:
        perturb_lora(model)
    torch.save({"config": config, "state_dict": model.state_dict()}, path)
    return str(path)


def perturb_lora(model):
    """LoRA's B matrices start at 0; give every trainable parameter random values so that it matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)


def tiny_llama(folder):
    """A 4-layer random Llama saved with a Llama-2-style tokenizer (see llama_fixture)."""
    path = Path(folder) / "tiny-llama"
    if not path.is_dir():
        save_tiny_llama(path, num_hidden_layers=4, num_key_value_heads=2, max_position_embeddings=128)
    return str(path)


# --- model ------------------------------------------------------------------------------------------------------
def test_item_table_is_the_sasrec_table_by_raw_token(setup):
    _, sasrec, dataset, _ = setup
    model = build(setup)
    by_token = _checkpoint_item_vectors(str(Path(sasrec).resolve()), Path(sasrec).stat().st_mtime_ns)
    tokens = dataset.field2id_token["item_id"]
    assert all(torch.equal(model.item_table.weight[i], by_token[tokens[i]]) for i in range(1, len(tokens)))
    # The SASRec run used the same dataset and config, so its ids are this dataset's.
    sas_table = torch.load(sasrec, weights_only=False)["state_dict"]["item_embedding.weight"]
    assert torch.equal(model.item_table.weight[1:], sas_table[1:len(tokens)])
    assert model.item_table.weight[0].abs().sum() == 0


def test_frozen_parts_get_no_gradient_lora_and_projections_do(setup):
    model = build(setup)
    model.calculate_loss(setup[3]).backward()
    assert model.item_table.weight.grad is None and not model.item_table.weight.requires_grad
    frozen = [p for n, p in model.backbone.named_parameters() if "lora_" not in n]
    assert frozen and all(p.grad is None for p in frozen)
    lora_b = [p for n, p in model.backbone.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    for layer in (model.input_proj, model.score):
        assert layer.weight.grad.abs().sum() > 0


def test_prompt_left_pads_items_and_masks_them(setup):
    model = build(setup)
    seq = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0]])
    inputs, mask = model.prompt_inputs(seq, torch.tensor([3]))
    n_instruction, n_response = len(model.instruction_ids), len(model.response_ids)
    assert inputs.shape[1] == n_instruction + 10 + n_response == mask.shape[1]
    assert mask[0, n_instruction:n_instruction + 10].tolist() == [0] * 7 + [1] * 3
    assert torch.allclose(inputs[0, n_instruction + 7], model.input_proj(model.item_table.weight[5]))
    embed = model.backbone.get_input_embeddings()
    assert torch.equal(inputs[0, -n_response:], embed(model.response_ids))


def test_truncation_keeps_the_first_layers_or_the_interval_selection(setup):
    from transformers import AutoModel

    from recbole_llm.text.encoders import encoder_path

    assert kept_layers(6, 2, 0) == [0, 1]
    assert kept_layers(8, None, 1) == [0, 2, 4, 6]  # every 2nd layer dropped, as the official 'interval'
    assert kept_layers(9, 4, 2) == [0, 1, 3, 4]
    full = AutoModel.from_pretrained(encoder_path({"llm_encoder": None}))
    for interval, expected in ((0, [0, 1]), (1, [0, 2])):
        layers = layer_list(build(setup, slmrec_n_layers=2, slmrec_interval=interval).backbone, "slmrec_backbone")
        assert len(layers) == 2
        for layer, index in zip(layers, expected):
            original = full.encoder.layer[index].attention.self.query.weight
            assert torch.equal(layer.attention.self.query.weight, original)


def test_tiny_llama_decoder_path(setup):
    model = build(setup, slmrec_backbone=tiny_llama(setup[0]), slmrec_n_layers=2)
    assert model.architecture == "llama-style" and model.n_layers == 2 and model.hidden_size == 32
    assert model.backbone.base_model.model.config.num_hidden_layers == 2
    trainable = {n.split(".")[-4] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"gate_proj", "up_proj", "down_proj"}  # the official LoRA targets
    perturb_lora(model)
    batch = setup[3]
    model.calculate_loss(batch).backward()
    assert model.input_proj.weight.grad.abs().sum() > 0
    model.eval()
    assert model.full_sort_predict(batch).shape == (len(batch), model.n_items)


@pytest.mark.parametrize("backbone", ["minilm", "llama"])
def test_gradient_checkpointing_leaves_the_gradients_unchanged(setup, backbone):
    keys = {"slmrec_n_layers": 2, "slmrec_lora_dropout": 0.0}
    if backbone == "llama":
        keys["slmrec_backbone"] = tiny_llama(setup[0])
    model = build(setup, **keys)
    perturb_lora(model)  # LoRA's B starts at 0, which would leave A without gradient
    plain, checkpointed = checkpointing_gradients(model, lambda: model.calculate_loss(setup[3]), seed=1)
    assert is_checkpointing(model.backbone.base_model.model)
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_llama_prompt_parts_hold_no_special_token(setup):
    from transformers import AutoTokenizer

    config, model = configured(setup, slmrec_backbone=tiny_llama(setup[0]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama(setup[0]))
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    for ids, key in ((model.instruction_ids, "slmrec_instruction"), (model.response_ids, "slmrec_response")):
        assert ids.tolist() == tokenizer(config[key], add_special_tokens=False)["input_ids"]
        assert not special & set(ids.tolist())
    assert tokenizer.convert_ids_to_tokens(model.response_ids.tolist())[-2:] == [":", "<0x0A>"]


def test_llama_last_state_is_the_response_end_and_left_pads_change_nothing(setup):
    """The last token is the response's last; a short sequence's state is the same alone or beside a full one,
    and whatever its masked pads hold."""
    model = build(setup, slmrec_backbone=tiny_llama(setup[0]))
    perturb_lora(model)
    model.eval()
    seq, lengths = torch.tensor([[5, 6, 7] + [0] * 7, list(range(3, 13))]), torch.tensor([3, 10])
    inputs, mask = model.prompt_inputs(seq, lengths)
    embed = model.backbone.get_input_embeddings()
    assert torch.equal(inputs[:, -1], embed(model.response_ids[-1:]).expand(2, -1)) and mask[:, -1].all()
    pads = torch.zeros_like(mask, dtype=torch.bool)
    pads[0, len(model.instruction_ids):len(model.instruction_ids) + 7] = True
    noisy = torch.where(pads[..., None], torch.randn_like(inputs), inputs)
    with torch.no_grad():
        batch, alone = model.last_state(seq, lengths), model.last_state(seq[:1], lengths[:1])
        with_noise = model.backbone(inputs_embeds=noisy, attention_mask=mask).last_hidden_state[:, -1]
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_noise, batch, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_loss_goes_down_on_a_tiny_fixture(setup):
    model = build(setup)
    batch = setup[3]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step() for _ in range(4)]
    assert losses[-1] < losses[0], losses


def test_predict_matches_full_sort_with_one_llm_pass_per_sequence(setup):
    model = build(setup).eval()
    batch = setup[3][:3]
    full = model.full_sort_predict(batch)
    rows = batch.repeat_interleave(4)  # each sequence with 4 candidate items, as a uni* evaluation batch
    items = torch.tensor([1, 2, 3, 4] * 3)
    rows.update(type(rows)({"item_id": items}))
    expected = full[torch.arange(3).repeat_interleave(4), items]
    assert torch.allclose(model.predict(rows), expected, atol=1e-5)


# --- checkpoints ------------------------------------------------------------------------------------------------
def test_checkpoint_holds_trainable_parameters_and_item_table_and_reloads_the_scores(setup, tmp_path):
    model = build(setup)
    perturb_lora(model)
    model.eval()
    state = model.state_dict()
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad} | {"item_table.weight"}
    other = build(setup)
    other.load_state_dict(state)
    other.eval()
    assert torch.allclose(model.full_sort_predict(setup[3]), other.full_sort_predict(setup[3]), atol=1e-6)
    with pytest.raises(RecBoleLLMError, match="does not match"):
        build(setup, slmrec_lora_r=2).load_state_dict(state)


def test_run_then_load_data_and_model_reproduce_the_test_result(setup):
    folder, sasrec = setup[0], setup[1]
    values = slmrec_values(folder, sasrec, llm_checkpoint_name="run.pth", llm_group_metrics=False)
    result = run("SLMRec", "test", config_dict=values)
    config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    reloaded = SLMRecTrainer(config, model).evaluate(test_data, load_best_model=False)
    assert dict(reloaded) == dict(result["test_result"])


# --- distillation -----------------------------------------------------------------------------------------------
def test_distances_equal_hand_computation():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert cosine_distance(student, teacher).item() == pytest.approx((0 + 1) / 2)
    assert l2_distance(student, teacher).item() == pytest.approx((1 + math.sqrt(5)) / 2)


def distillation_setup(setup, tmp_path, **student_overrides):
    """(trainer, student, teacher): a 2-layer teacher checkpoint and a distilled student."""
    path = save_checkpoint(setup, tmp_path / "teacher.pth", perturb=True, slmrec_n_layers=2)
    values = {"slmrec_distill": True, "slmrec_distill_blocks": 2, "slmrec_teacher_checkpoint": path,
              "slmrec_n_layers": 2, **student_overrides}
    config, student = configured(setup, **values)
    trainer = SLMRecTrainer(config, student)
    return trainer, student, trainer.teacher


def test_distillation_terms_equal_hand_computation_and_teacher_gets_no_gradient(setup, tmp_path):
    trainer, student, teacher = distillation_setup(setup, tmp_path, slmrec_cos_weight=0.7, slmrec_l2_weight=0.2,
                                                   slmrec_ms_weight=0.5)
    assert trainer.loss_names == ("ce", "cos", "l2", "ms") and student.blocks == [1, 2]
    batch = setup[3]
    student.eval()  # no dropout: the hand computation below sees the same states
    ce, cos, l2, ms = trainer.distillation_losses(batch)
    seq, seq_len, target = batch["item_id_list"], batch["item_length"], batch["item_id"]
    s_states, t_states = student.layer_states(seq, seq_len), teacher.layer_states(seq, seq_len)
    assert torch.allclose(t_states[2], teacher.last_state(seq, seq_len), atol=1e-5)
    pairs = [(s_states[1], t_states[1]), (s_states[2], t_states[2])]
    hand_cos = sum((1 - F.cosine_similarity(s, t, dim=-1)).mean() for s, t in pairs)
    hand_l2 = sum(torch.sqrt(((s - t) ** 2).sum(-1)).mean() for s, t in pairs)
    logits = student.ms_heads[0](s_states[1]) @ student.item_table.weight.T
    assert ce.item() == pytest.approx(student.calculate_loss(batch).item(), rel=1e-5)
    assert cos.item() == pytest.approx(0.7 * hand_cos.item(), rel=1e-5)
    assert l2.item() == pytest.approx(0.2 * hand_l2.item(), rel=1e-5)
    assert ms.item() == pytest.approx(0.5 * F.cross_entropy(logits, target).item(), rel=1e-5)
    sum((ce, cos, l2, ms)).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.ms_heads[0].weight.grad.abs().sum() > 0 and student.item_table.weight.grad is None


def test_a_zero_weight_switches_its_term_off(setup, tmp_path):
    trainer, *_ = distillation_setup(setup, tmp_path, slmrec_l2_weight=0.0, slmrec_ms_weight=0.0)
    assert trainer.loss_names == ("ce", "cos") and len(trainer.distillation_losses(setup[3])) == 2


# --- errors -----------------------------------------------------------------------------------------------------
def test_missing_or_foreign_item_checkpoint_is_refused(setup, tmp_path):
    folder, _, dataset, _ = setup
    with pytest.raises(RecBoleLLMError, match="needs slmrec_item_emb_checkpoint"):
        SLMRec(slmrec_config(folder, "", slmrec_item_emb_checkpoint=None), dataset)
    small = tmp_path / "data" / "small"
    small.mkdir(parents=True)
    lines = (folder / "data" / "test" / "test.inter").read_text().splitlines()
    (small / "small.inter").write_text("\n".join(l for l in lines if l.split("\t")[0] in ("user_id:token", "1", "2")))
    other = run("SASRecAP", "small", config_dict=tiny_config(tmp_path, dataset="small", llm_checkpoint_name="s.pth"))
    with pytest.raises(RecBoleLLMError, match="lacks .* of the .* items of dataset 'test'"):
        SLMRec(slmrec_config(folder, other["saved_model_file"]), dataset)


def test_mismatching_teachers_and_switches_are_refused(setup, tmp_path):
    good = save_checkpoint(setup, tmp_path / "teacher.pth", slmrec_n_layers=2)
    distill = {"slmrec_distill": True, "slmrec_distill_blocks": 2, "slmrec_n_layers": 2}

    def refused(match, **overrides):
        config, student = configured(setup, **{**distill, **overrides})
        with pytest.raises(RecBoleLLMError, match=match):
            SLMRecTrainer(config, student)

    refused("needs slmrec_teacher_checkpoint")
    refused("slmrec_distill is False", slmrec_distill=False, slmrec_teacher_checkpoint=good)
    refused("are all 0", slmrec_teacher_checkpoint=good, slmrec_cos_weight=0.0, slmrec_l2_weight=0.0,
            slmrec_ms_weight=0.0)
    refused("not an SLMRec", slmrec_teacher_checkpoint=setup[1])
    state = torch.load(good, weights_only=False)
    state["config"]["dataset"] = "other"
    torch.save(state, tmp_path / "other.pth")
    refused("trained on dataset 'other'", slmrec_teacher_checkpoint=str(tmp_path / "other.pth"))
    state = torch.load(good, weights_only=False)
    state["state_dict"]["item_table.weight"] = state["state_dict"]["item_table.weight"] + 1
    torch.save(state, tmp_path / "table.pth")
    refused("item table differs", slmrec_teacher_checkpoint=str(tmp_path / "table.pth"))
    llama = save_checkpoint(setup, tmp_path / "l.pth", slmrec_backbone=tiny_llama(setup[0]), slmrec_n_layers=2)
    refused("hidden size is 32, the student's 384", slmrec_teacher_checkpoint=llama)
    with pytest.raises(RecBoleLLMError, match="must divide"):
        build(setup, **{**distill, "slmrec_distill_blocks": 3})
    with pytest.raises(RecBoleLLMError, match="slmrec_n_layers must lie in 1..6"):
        build(setup, slmrec_n_layers=7)


# --- FullMRR ----------------------------------------------------------------------------------------------------
def test_full_mrr_is_the_untruncated_mean_reciprocal_rank(setup):
    import recbole_llm.evaluator  # noqa: F401  (registers FullMRR)

    config = Config(model="SASRec", config_dict=tiny_config(setup[0], metrics=["FullMRR", "MRR"], topk=[2]))
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1],   # target item 2: rank 2
                           [0.1, 0.8, 0.3, 0.2],   # target item 1: rank 1
                           [0.9, 0.8, 0.7, 0.1]])  # target item 3: rank 4, beyond MRR@2
    collector = Collector(config)
    collector.eval_batch_collect(scores, None, torch.tensor([0, 1, 2]), torch.tensor([2, 1, 3]))
    result = Evaluator(config).evaluate(collector.get_data_struct())
    assert result["fullmrr"] == pytest.approx(round((1 / 2 + 1 + 1 / 4) / 3, 4))
    assert result["mrr@2"] == pytest.approx(round((1 / 2 + 1) / 3, 4))
    collector.eval_batch_collect(scores, None, torch.tensor([0, 0, 1, 2]), torch.tensor([2, 0, 1, 3]))
    with pytest.raises(RecBoleLLMError, match="one target per evaluated row"):
        Evaluator(config).evaluate(collector.get_data_struct())
