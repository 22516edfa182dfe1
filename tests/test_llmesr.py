"""LLM-ESR: the dual views, the frozen/trainable split, the distillation teacher, the losses and the ablation switches."""
import math

import pytest
import torch
import torch.nn.functional as F
from recbole.data import data_preparation

from conftest import tiny_config, write_tiny_dataset
from recbole_llm.config import Config
from recbole_llm.model.layers import soft_contrastive_loss, whitened
from recbole_llm.text import item_vectors, pca_item_vectors
from recbole_llm.utils import RecBoleLLMError, create_dataset, get_model

ITEM_COLUMNS = {"inter": ["user_id", "item_id", "rating", "timestamp"],
                "item": ["item_id", "movie_title", "release_year", "class"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("llmesr")
    write_tiny_dataset(tmp_path / "data")
    return tmp_path


def build(data_dir, model="LLMESR_SASRec", **overrides):
    """(model, a training batch, config, train dataset) for one tiny configuration."""
    config = Config(model=model, config_dict=tiny_config(data_dir, load_col=ITEM_COLUMNS, **overrides))
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    torch.manual_seed(0)
    net = get_model(model)(config, train_data._dataset)
    return net, next(iter(train_data)), config, train_data._dataset, test_data


def total_loss(net, batch):
    losses = net.calculate_loss(batch)
    return sum(losses) if isinstance(losses, tuple) else losses


@pytest.mark.parametrize("model", ["LLMESR_SASRec", "LLMESR_GRU4Rec", "LLMESR_Bert4Rec"])
def test_shapes(data_dir, model):
    net, batch, _, _, _ = build(data_dir, model)
    width = net.view_size
    seq, seq_len = batch[net.ITEM_SEQ], batch[net.ITEM_SEQ_LEN]
    assert net.forward(seq, seq_len).shape == (len(seq), 2 * width)
    assert net.item_matrix().shape == (net.n_items, 2 * width)
    net.eval()
    assert net.full_sort_predict(batch).shape == (len(seq), net.n_items)


def test_frozen_llm_table_gets_no_gradient_adapter_and_id_table_do(data_dir):
    net, batch, *_ = build(data_dir)
    total_loss(net, batch).backward()
    assert not net.llm_item_embedding.weight.requires_grad and net.llm_item_embedding.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.adapter.parameters())
    assert net.item_embedding.weight.grad.abs().sum() > 0
    assert net.llm_to_id.query.weight.grad.abs().sum() > 0


def test_tables_hold_side_data_rows_at_step_zero(data_dir):
    net, _, config, dataset, _ = build(data_dir)
    llm = item_vectors(dataset, config)
    pca = pca_item_vectors(dataset, config, net.view_size)
    assert torch.equal(net.llm_item_embedding.weight, llm)
    assert torch.allclose(net.item_embedding.weight, pca)
    assert net.item_embedding.weight[0].abs().sum() == 0  # [PAD]


def test_random_id_init_ignores_pca(data_dir):
    net, _, config, dataset, _ = build(data_dir, llmesr_id_init="random")
    assert not torch.allclose(net.item_embedding.weight, pca_item_vectors(dataset, config, net.view_size))


def test_teacher_is_mean_of_similar_users_features_and_has_no_gradient(data_dir):
    net, batch, *_ = build(data_dir, llmesr_teacher="batch")
    net.eval()  # no dropout, so the teacher can be recomputed exactly
    users = batch[net.USER_ID][:4]
    teacher = net.teacher(users)
    assert not teacher.requires_grad
    for row, user in enumerate(users):
        similar = net.similar_users[user]
        feats = net.forward(net.user_seq[similar], net.user_seq_len[similar])
        assert torch.allclose(teacher[row], feats.mean(0), atol=1e-5)


def test_epoch_teacher_table_equals_batch_teacher_and_refreshes_on_train(data_dir):
    net, batch, *_ = build(data_dir, llmesr_teacher="epoch")
    net.eval()
    users = batch[net.USER_ID][:8]
    from_table = net.teacher(users)
    net.teacher_mode = "batch"
    assert torch.allclose(from_table, net.teacher(users), atol=1e-5)
    assert net._teacher_table is not None
    net.teacher_mode = "epoch"
    net.train()
    assert net._teacher_table is None


@pytest.mark.parametrize("model", ["LLMESR_SASRec", "LLMESR_Bert4Rec"])
def test_running_teacher_rows_are_the_training_steps_own_features(data_dir, model):
    """After a step, a user whose full training sequence was in the batch has that step's feature as its row;
    the other rows keep the first pass; the table survives train() (no per-epoch pass)."""
    net, batch, *_ = build(data_dir, model, llmesr_teacher="running")
    net.eval()  # no dropout, so the step's features can be recomputed
    users = batch[net.USER_ID]
    full = (batch[net.ITEM_SEQ] == net.user_seq[users]).all(-1)
    assert full.any()
    features = net.forward(batch[net.ITEM_SEQ], batch[net.ITEM_SEQ_LEN]).detach()
    with torch.no_grad():
        net.item_embedding.weight.add_(torch.randn_like(net.item_embedding.weight))  # the step's features differ
    first_pass = net._encode_users(torch.arange(net.n_users))
    net.calculate_loss(batch)
    stepped = net.forward(batch[net.ITEM_SEQ], batch[net.ITEM_SEQ_LEN]).detach()
    table = net._teacher_table
    assert torch.allclose(table[users[full]], stepped[full], atol=1e-5)
    assert not torch.allclose(stepped[full], features[full], atol=1e-3)
    untouched = torch.ones(net.n_users, dtype=torch.bool)
    untouched[users[full]] = False
    assert torch.allclose(table[untouched], first_pass[untouched], atol=1e-5)
    net.train()
    assert net._teacher_table is table



def test_teacher_passes_run_a_training_batch_of_users_at_a_time(data_dir):
    net, *_ = build(data_dir, train_batch_size=3)
    net.eval()  # no dropout, so the chunked and the one-pass tables can be compared
    sizes = []
    forward = net.forward
    net.forward = lambda seq, lengths: sizes.append(len(seq)) or forward(seq, lengths)
    table = net._encode_users(torch.arange(net.n_users))
    assert max(sizes) == 3 and sum(sizes) == net.n_users  # the peak memory of a pass is a training batch's
    net._teacher_chunk = net.n_users
    assert torch.allclose(net._encode_users(torch.arange(net.n_users)), table, atol=1e-5)

def test_user_training_sequences_exclude_the_last_training_item(data_dir):
    net, _, _, dataset, test_data = build(data_dir)
    test_batch = next(iter(test_data))[0]
    user = int(test_batch[net.USER_ID][0])
    test_seq = test_batch[net.ITEM_SEQ][0, : test_batch[net.ITEM_SEQ_LEN][0]].tolist()  # train + valid items
    length = int(net.user_seq_len[user])
    # Training = all but valid and test; minus its last item, it ends where the test input (train + valid, the
    # last max_seq_length of them) ends minus two items.
    assert len(test_seq) > 2 and net.user_seq[user, :length].tolist()[-(len(test_seq) - 2):] == test_seq[:-2]


def test_kd_and_cl_losses_equal_hand_computation():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    assert F.mse_loss(u, t).item() == pytest.approx(((0.5**2 + 0.5**2) + (1 + 1)) / 4)
    # logits = u t^T = [[0.5, 1], [1, 2]]; targets = softmax((u u^T + t t^T) / 2) row-wise
    sim = [[(1 + 0.5) / 2, (0 + 1) / 2], [(0 + 1) / 2, (4 + 2) / 2]]
    targets = [[math.exp(a) / sum(math.exp(b) for b in row) for a in row] for row in sim]
    logits = [[0.5, 1.0], [1.0, 2.0]]

    def soft_ce(rows, target_rows):
        total = 0.0
        for row, target in zip(rows, target_rows):
            log_z = math.log(sum(math.exp(v) for v in row))
            total += -sum(p * (v - log_z) for p, v in zip(target, row))
        return total

    columns = [list(c) for c in zip(*logits)]
    target_columns = [list(c) for c in zip(*targets)]
    expected = (soft_ce(logits, targets) + soft_ce(columns, target_columns)) / 2 / 2
    assert soft_contrastive_loss(u, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["CE", "BPR", "BCE"])
@pytest.mark.parametrize("mode", ["prefix", "all_positions"])
def test_loss_goes_down_on_a_tiny_fixture(data_dir, loss_type, mode):
    # One batch of 16 sequences, trained on repeatedly, without dropout: small enough to overfit.
    net, batch, *_ = build(data_dir, loss_type=loss_type, llm_train_mode=mode, train_batch_size=16,
                           hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = total_loss(net, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_and_reload_give_the_same_scores(data_dir, tmp_path):
    net, batch, config, dataset, _ = build(data_dir)
    total_loss(net, batch).backward()
    net.eval()
    before = net.full_sort_predict(batch)
    torch.save(net.state_dict(), tmp_path / "m.pth")
    torch.manual_seed(1)
    other = get_model("LLMESR_SASRec")(config, dataset)
    other.load_state_dict(torch.load(tmp_path / "m.pth"))
    other.eval()
    assert torch.allclose(before, other.full_sort_predict(batch), atol=1e-5)


def test_eval_item_matrix_is_built_once_and_dropped_on_reload(data_dir):
    net, batch, *_ = build(data_dir)
    net.eval()
    net.full_sort_predict(batch)
    cached = net._eval_item_matrix
    net.full_sort_predict(batch)
    assert net._eval_item_matrix is cached
    net.load_state_dict(net.state_dict())
    assert net._eval_item_matrix is None


def test_ablation_switches(data_dir):
    full, batch, *_ = build(data_dir)
    no_llm, *_ = build(data_dir, llmesr_use_llm_view=False, llmesr_cross_attention=False)
    no_id, *_ = build(data_dir, llmesr_use_id_view=False, llmesr_cross_attention=False)
    no_cross, *_ = build(data_dir, llmesr_cross_attention=False)
    one_layer, *_ = build(data_dir, llmesr_adapter_layers=1)
    no_sd, *_ = build(data_dir, llmesr_distill=False)
    width = full.view_size
    seq, seq_len = batch[full.ITEM_SEQ], batch[full.ITEM_SEQ_LEN]
    assert no_llm.forward(seq, seq_len).shape[-1] == width and no_llm.item_matrix().shape[-1] == width
    assert torch.equal(no_llm.item_matrix(), no_llm.item_embedding.weight[: no_llm.n_items])
    semantic = no_id.adapter(no_id.llm_item_embedding.weight[: no_id.n_items])
    assert torch.allclose(no_id.item_matrix(), no_id.llm_score_weight * semantic)
    assert not hasattr(no_cross, "llm_to_id") and hasattr(full, "llm_to_id")
    assert isinstance(one_layer.adapter, torch.nn.Linear) and len(full.adapter) == 2
    assert len(full.calculate_loss(batch)) == 2 and len(no_sd.calculate_loss(batch)) == 1
    item_reg, *_ = build(data_dir, llmesr_item_reg=True)
    assert len(item_reg.calculate_loss(batch)) == 3


def test_whitened_vectors_are_centred_with_unit_covariance_and_keep_zero_rows():
    torch.manual_seed(0)
    raw = torch.randn(50, 6) @ torch.randn(6, 6) + 3.0  # correlated, off-centre
    raw[0] = 0.0  # the padding row
    raw[7] = 0.0  # an item without text
    out = whitened(raw)
    kept = torch.ones(50, dtype=torch.bool)
    kept[[0, 7]] = False
    assert torch.equal(out[0], torch.zeros(6)) and torch.equal(out[7], torch.zeros(6))
    assert torch.allclose(out[kept].mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(torch.cov(out[kept].T), torch.eye(6), atol=1e-4)
    # no information is lost: an affine map of the whitened rows gives back the raw rows
    design = torch.cat([out[kept], torch.ones(48, 1)], 1).double()
    solution = torch.linalg.lstsq(design, raw[kept].double()).solution
    assert torch.allclose(design @ solution, raw[kept].double(), atol=1e-6)


def test_whiten_switch_feeds_the_adapter_whitened_rows(data_dir):
    plain, *_ = build(data_dir)
    white, batch, *_ = build(data_dir, llmesr_llm_whiten=True)
    raw = plain.llm_item_embedding.weight
    assert torch.allclose(white.llm_item_embedding.weight, whitened(raw))
    assert not white.llm_item_embedding.weight.requires_grad
    assert torch.isfinite(total_loss(white, batch))


def test_gelu_adapter_is_nonlinear_and_keeps_the_linear_adapters_keys(data_dir):
    linear, *_ = build(data_dir)
    gelu, batch, *_ = build(data_dir, llmesr_adapter_activation="gelu")
    assert [k for k in linear.adapter.state_dict()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert isinstance(gelu.adapter[1], torch.nn.GELU)
    x = torch.randn(4, linear.llm_item_embedding.embedding_dim)
    # a linear map takes the mean of two inputs to the mean of their images; the GELU adapter does not
    for net, is_linear in ((linear, True), (gelu, False)):
        mid = net.adapter((x[:2] + x[2:]) / 2)
        assert torch.allclose(mid, (net.adapter(x[:2]) + net.adapter(x[2:])) / 2, atol=1e-6) == is_linear
    total_loss(gelu, batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gelu.adapter.parameters())
    with pytest.raises(RecBoleLLMError, match="llmesr_adapter_layers: 2"):
        build(data_dir, llmesr_adapter_layers=1, llmesr_adapter_activation="gelu")
    with pytest.raises(RecBoleLLMError, match="llmesr_adapter_activation"):
        build(data_dir, llmesr_adapter_activation="relu6")


@pytest.mark.parametrize("model", ["LLMESR_SASRec", "LLMESR_GRU4Rec"])
def test_no_position_reads_a_later_item(data_dir, model):
    # In all-positions training position t predicts item t + 1: if any path (the cross-attention included) let
    # position t see later items, the model would learn to copy its target.
    net, batch, *_ = build(data_dir, model)
    net.eval()
    seq = batch[net.ITEM_SEQ][:4].clone()
    before = net.sequence_features(seq)
    seq[:, 6] = seq[:, 6] % (net.n_items - 1) + 1  # another real item at position 6
    after = net.sequence_features(seq)
    assert torch.allclose(before[:, :6], after[:, :6], atol=1e-6)
    assert not torch.allclose(before[:, 6:], after[:, 6:])


# --- the switches beyond the official model (each off in the faithful setting) -----------------------------------

def _raw_views(net, seq):
    """The two views as they enter the cross-attention (eval mode: no dropout)."""
    return (net._view_input(net.item_embedding(seq), seq),
            net._view_input(net.adapter(net.llm_item_embedding(seq)), seq))


@pytest.mark.parametrize("norm", [False, True])
def test_cross_residual_adds_each_view_to_its_cross_attention(data_dir, norm):
    net, batch, *_ = build(data_dir, llmesr_cross_residual=True, llmesr_cross_norm=norm)
    net.eval()
    seq = batch[net.ITEM_SEQ][:4]
    id_view, llm_view = _raw_views(net, seq)
    id_hand = net.llm_to_id(llm_view, id_view, seq, causal=True) + id_view
    llm_hand = net.id_to_llm(id_view, llm_view, seq, causal=True) + llm_view
    if norm:
        id_hand, llm_hand = (F.layer_norm(x, (net.view_size,), net.cross_norm.weight, net.cross_norm.bias, 1e-12)
                             for x in (id_hand, llm_hand))
    id_out, llm_out = net._view_inputs(seq)
    assert torch.allclose(id_out, id_hand, atol=1e-6) and torch.allclose(llm_out, llm_hand, atol=1e-6)


def test_faithful_cross_attention_replaces_the_views(data_dir):
    net, batch, *_ = build(data_dir, llmesr_setting="faithful")
    net.eval()
    seq = batch[net.ITEM_SEQ][:4]
    id_view, llm_view = _raw_views(net, seq)
    id_out, _ = net._view_inputs(seq)
    assert torch.allclose(id_out, net.llm_to_id(llm_view, id_view, seq, causal=True), atol=1e-6)
    assert isinstance(net.cross_norm, torch.nn.Identity)
    assert not any("cross_norm" in name for name in net.state_dict())  # faithful checkpoints keep their keys


@pytest.mark.parametrize("model", ["LLMESR_SASRec", "LLMESR_GRU4Rec", "LLMESR_Bert4Rec"])
def test_activation_checkpointing_recomputes_the_views_and_leaves_the_gradients_unchanged(data_dir, model):
    grads, encodes_with_grad = [], []
    for checkpointing in (False, True):
        net, batch, *_ = build(data_dir, model, llmesr_activation_checkpointing=checkpointing)
        encode = net._encode

        def counted(*args, encode=encode, checkpointing=checkpointing):
            if torch.is_grad_enabled():
                encodes_with_grad.append(checkpointing)
            return encode(*args)

        net._encode = counted
        net.train()
        torch.manual_seed(1)  # the same dropout masks in both runs, which the recomputation must replay
        total_loss(net, batch).backward()
        grads.append({name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None})
    assert encodes_with_grad.count(False) == 2 and encodes_with_grad.count(True) == 4  # 2 views, then again in backward
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_cross_norm_gets_gradient(data_dir):
    net, batch, *_ = build(data_dir, llmesr_cross_residual=True, llmesr_cross_norm=True)
    total_loss(net, batch).backward()
    assert net.cross_norm.weight.grad.abs().sum() > 0 and net.cross_norm.bias.grad.abs().sum() > 0


def test_xavier_init_of_the_added_layers_keeps_pytorch_biases(data_dir):
    backbone, *_ = build(data_dir)
    xavier, *_ = build(data_dir, hidden_size=64, inner_size=64, llmesr_init="xavier")
    first = xavier.adapter[0]
    expected_std = math.sqrt(2.0 / (first.in_features + first.out_features))
    assert first.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert xavier.llm_to_id.query.weight.std().item() == pytest.approx(math.sqrt(2.0 / 128), rel=0.05)
    assert xavier.llm_to_id.output.bias.abs().sum() > 0  # PyTorch's uniform bias init, as in the official code
    assert backbone.llm_to_id.output.bias.abs().sum() == 0  # RecBole's _init_weights zeroes biases
    assert backbone.adapter[0].weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_llm_score_weight_scales_only_the_semantic_dot_product(data_dir):
    plain, batch, *_ = build(data_dir, llmesr_llm_score_weight=1.0)
    weighted, *_ = build(data_dir, llmesr_llm_score_weight=2.5)
    weighted.load_state_dict(plain.state_dict())
    plain.eval(), weighted.eval()
    width = plain.view_size
    users = plain.forward(batch[plain.ITEM_SEQ], batch[plain.ITEM_SEQ_LEN])
    id_part = users[:, :width] @ plain.item_embedding.weight[: plain.n_items].T
    llm_part = users[:, width:] @ plain.adapter(plain.llm_item_embedding.weight[: plain.n_items]).T
    assert torch.allclose(weighted.full_sort_predict(batch), id_part + 2.5 * llm_part, atol=1e-5)
    assert torch.allclose(plain.full_sort_predict(batch), id_part + llm_part, atol=1e-5)


def test_logit_adjustment_shifts_the_training_logits_but_not_the_scores(data_dir):
    plain, batch, _, dataset, _ = build(data_dir, model="DualLLMSASRec")
    adjusted, *_ = build(data_dir, model="DualLLMSASRec", llm_logit_adjustment=0.5)
    adjusted.load_state_dict(plain.state_dict())  # the prior is no parameter: the same weights load
    plain.eval(), adjusted.eval()
    counts = [1] * dataset.item_num  # add-one smoothed counts of the training split's targets, by hand
    for item in dataset.inter_feat[plain.target_list].flatten().tolist():
        counts[item] += item > 0
    expected = torch.tensor([0.5 * math.log(c / sum(counts)) for c in counts])
    assert torch.allclose(adjusted.logit_prior, expected, atol=1e-6)
    outputs, row_targets, _ = plain._rec_outputs_and_targets(batch)
    with torch.no_grad():
        logits = outputs @ plain.item_matrix().T
        assert torch.allclose(adjusted.rec_loss(outputs, row_targets),
                              F.cross_entropy(logits + adjusted.logit_prior, row_targets), atol=1e-5)
        assert torch.allclose(plain.rec_loss(outputs, row_targets), F.cross_entropy(logits, row_targets), atol=1e-5)
        assert torch.equal(adjusted.full_sort_predict(batch), plain.full_sort_predict(batch))
    with pytest.raises(RecBoleLLMError, match="adjusts the softmax of loss_type 'CE', not 'BCE'"):
        build(data_dir, model="DualLLMSASRec", llm_logit_adjustment=0.5, loss_type="BCE")


def test_id_view_dropout_one_ranks_every_training_row_by_the_semantic_view_alone(data_dir):
    no_dropout = dict(model="DualLLMSASRec", hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    plain, batch, *_ = build(data_dir, **no_dropout)
    dropped, *_ = build(data_dir, llmesr_id_view_dropout=1.0, **no_dropout)
    dropped.load_state_dict(plain.state_dict())
    width = plain.view_size
    outputs, targets, _ = plain._rec_outputs_and_targets(batch)
    semantic_logits = outputs[:, width:] @ plain.item_matrix()[:, width:].T
    assert torch.allclose(dropped.calculate_loss(batch)[0], F.cross_entropy(semantic_logits, targets), atol=1e-5)
    assert not torch.allclose(plain.calculate_loss(batch)[0], F.cross_entropy(semantic_logits, targets), atol=1e-3)
    dropped.eval(), plain.eval()
    assert torch.equal(dropped.full_sort_predict(batch), plain.full_sort_predict(batch))  # ranking keeps both views


def test_id_view_dropout_zeroes_the_id_features_of_a_share_of_rows_and_no_gradient_reaches_their_id_rows(data_dir):
    net, batch, *_ = build(data_dir, model="DualLLMSASRec", llmesr_id_view_dropout=0.5)
    width = net.view_size
    outputs = torch.randn(2000, 2 * width)
    kept = net._drop_id_view(outputs)
    zeroed = (kept[:, :width] == 0).all(-1)
    assert torch.equal(kept[~zeroed], outputs[~zeroed]) and torch.equal(kept[:, width:], outputs[:, width:])
    assert 0.45 < zeroed.float().mean() < 0.55
    net.eval()
    assert torch.equal(net._drop_id_view(outputs), outputs)
    solo, *_ = build(data_dir, model="DualLLMSASRec", llmesr_id_view_dropout=1.0, llmesr_cross_attention=False)
    solo.calculate_loss(batch)[0].backward()  # without cross-attention the ID table feeds only the ID view
    assert solo.item_embedding.weight.grad is None or solo.item_embedding.weight.grad.abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in solo.adapter.parameters())


def test_id_view_dropout_errors_out_of_range_and_with_one_view(data_dir):
    with pytest.raises(RecBoleLLMError, match=r"llmesr_id_view_dropout is 1.5: .* \[0, 1\]"):
        build(data_dir, model="DualLLMSASRec", llmesr_id_view_dropout=1.5)
    with pytest.raises(RecBoleLLMError, match="llmesr_id_view_dropout needs both views"):
        build(data_dir, model="DualLLMSASRec", llmesr_id_view_dropout=0.2, llmesr_use_llm_view=False,
              llmesr_cross_attention=False)


@pytest.mark.parametrize("model", ["LLMESR_SASRec", "LLMESR_Bert4Rec"])
def test_input_scale_switch_multiplies_only_the_item_embedding(data_dir, model):
    scaled, batch, *_ = build(data_dir, model, llmesr_input_scale=True)
    plain, *_ = build(data_dir, model, llmesr_input_scale=False)
    plain.load_state_dict(scaled.state_dict())
    scaled.eval(), plain.eval()
    seq = batch[scaled.ITEM_SEQ][:4]
    items = scaled.item_embedding(seq)
    positions = scaled.position_embedding(torch.arange(seq.size(1)).expand_as(seq))
    for net, factor in ((scaled, math.sqrt(scaled.view_size)), (plain, 1.0)):
        hand = F.layer_norm(items * factor + positions, (net.view_size,), net.LayerNorm.weight, net.LayerNorm.bias,
                            net.LayerNorm.eps)
        assert torch.allclose(net._view_input(items, seq), hand, atol=1e-6)
    assert not torch.allclose(scaled.full_sort_predict(batch), plain.full_sort_predict(batch))


def test_item_profile_neighbours_are_the_nearest_mean_item_vectors(data_dir):
    net, *_ = build(data_dir, llmesr_sim_user_source="items", llmesr_sim_user_num=3)
    seqs = net.user_seq[1:]
    profiles = net.llm_item_embedding(seqs).sum(1) / (seqs > 0).sum(1, keepdim=True)
    cosine = F.normalize(profiles, dim=1) @ F.normalize(profiles, dim=1).T
    cosine.fill_diagonal_(-2)
    expected = cosine.topk(3, dim=1).indices + 1
    assert torch.equal(net.similar_users[1:], expected)
    assert (net.similar_users[1:] != torch.arange(1, net.n_users).unsqueeze(1)).all()  # never the user itself
    text, *_ = build(data_dir, llmesr_sim_user_num=3)
    assert not torch.equal(text.similar_users, net.similar_users)  # the official text neighbours differ


def test_faithful_setting_restores_the_official_switches_under_the_users_keys(data_dir):
    switches = ("llmesr_cross_residual", "llmesr_cross_norm", "llmesr_init", "llmesr_llm_score_weight",
                "llmesr_sim_user_source", "llmesr_alpha", "llmesr_input_scale", "llm_logit_adjustment",
                "llmesr_id_view_dropout", "llmesr_llm_whiten", "llmesr_adapter_activation")
    official = {"llmesr_cross_residual": False, "llmesr_cross_norm": False, "llmesr_init": "backbone",
                "llmesr_llm_score_weight": 1.0, "llmesr_sim_user_source": "text", "llmesr_alpha": 0.1,
                "llmesr_input_scale": True, "llm_logit_adjustment": 0.0, "llmesr_id_view_dropout": 0.0,
                "llmesr_llm_whiten": False, "llmesr_adapter_activation": "none"}
    faithful = Config(model="LLMESR_SASRec", config_dict=tiny_config(data_dir, llmesr_setting="faithful"))
    assert {key: faithful[key] for key in switches} == official
    assert faithful["llmesr_cross_attention"] and faithful["llmesr_distill"]  # the paper's model keeps both
    mixed = Config(model="LLMESR_SASRec", config_dict=tiny_config(data_dir, llmesr_setting="faithful",
                                                                  llmesr_cross_norm=True))
    assert mixed["llmesr_cross_norm"] is True and mixed["llmesr_cross_residual"] is False


def test_only_llmesr_sasrec_reads_its_own_measured_defaults(data_dir):
    own = Config(model="LLMESR_SASRec", config_dict=tiny_config(data_dir))
    assert own["llmesr_input_scale"] is False and own["llmesr_llm_score_weight"] == 2.0
    for model in ("DualLLMSASRec", "LLMESR_Bert4Rec", "LLMESR_GRU4Rec"):
        other = Config(model=model, config_dict=tiny_config(data_dir))
        assert other["llmesr_input_scale"] is True and other["llmesr_llm_score_weight"] == 1.0, model


def test_unknown_setting_names_the_known_ones(data_dir):
    with pytest.raises(RecBoleLLMError, match=r"'llmesr_setting' is 'paper'.*\['default', 'faithful'\]"):
        Config(model="LLMESR_SASRec", config_dict=tiny_config(data_dir, llmesr_setting="paper"))
