"""Top-k recommendation from a saved checkpoint of any recbole_llm or stock RecBole model.

    python -m recbole_llm.recommend --checkpoint saved/SASRec-....pth --user 196 --topk 10
    python -m recbole_llm.recommend --checkpoint saved/SASRec-....pth --items 242,302,377 --topk 10

Sequential models read the user's whole history (the most recent ``MAX_ITEM_LIST_LENGTH`` items), or the given
item sequence; other models score by user id. Items already in the history are never recommended.
"""
import argparse
import sys

import torch
from recbole.data.interaction import Interaction
from recbole.utils import ModelType

from recbole_llm.utils import RecBoleLLMError, recbole_time_order


def _internal_ids(dataset, field, raw_tokens):
    token_id = dataset.field2token_id[field]
    unknown = [t for t in raw_tokens if t not in token_id]
    if unknown:
        raise RecBoleLLMError(f"unknown {field} {', '.join(unknown)}: not in dataset '{dataset.dataset_name}'.")
    return [token_id[t] for t in raw_tokens]


def user_history(dataset, user_id):
    """A user's internal item ids in time order, as RecBole orders sequences (a stable sort on the time field).

    ``dataset`` must be unbuilt (fresh from ``create_dataset``): building a sequential dataset replaces
    ``inter_feat`` with its augmented training targets.
    """
    rows = dataset.inter_feat[dataset.inter_feat[dataset.uid_field] == user_id]
    items = rows[dataset.iid_field].to_numpy()
    if dataset.time_field in rows:
        items = items[recbole_time_order(rows[dataset.time_field].to_numpy())]
    return items.tolist()


def sequence_interaction(model, item_ids, user_id=0):
    """A one-row batch holding the last ``max_seq_length`` items, as RecBole's loaders build it."""
    recent = item_ids[-model.max_seq_length:]
    item_seq = torch.zeros(1, model.max_seq_length, dtype=torch.long)
    item_seq[0, :len(recent)] = torch.tensor(recent)
    return Interaction({model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: torch.tensor([len(recent)]),
                        model.USER_ID: torch.tensor([user_id])})


@torch.no_grad()
def recommend(model, history, topk, user_id=None):
    """``(item ids, scores)``: the top-k internal item ids, never an item of ``history``.

    Sequential models read ``history`` (internal ids, oldest first); other models score ``user_id``.
    """
    model.eval()
    if model.type == ModelType.SEQUENTIAL:
        if not history:
            raise RecBoleLLMError("a sequential model needs at least one item in the history (--items or --user).")
        interaction = sequence_interaction(model, history, user_id or 0)
    elif user_id is None:
        raise RecBoleLLMError(f"{model.__class__.__name__} is not sequential: pass --user, not --items.")
    else:
        interaction = Interaction({model.USER_ID: torch.tensor([user_id])})
    if topk < 1:
        raise RecBoleLLMError(f"--topk must be at least 1, got {topk}.")
    device = next(model.parameters()).device
    scores = model.full_sort_predict(interaction.to(device)).view(-1).cpu()
    scores[0] = -torch.inf  # [PAD]
    scores[history] = -torch.inf
    top = torch.topk(scores, min(topk, int(torch.isfinite(scores).sum())))  # never a seen item to fill the list
    return top.indices.tolist(), top.values.tolist()


def item_title(dataset, item_id):
    """A readable name: the first text field of the .item file, joined from its tokens, when there is one."""
    if dataset.item_feat is None:
        return ""
    for field in ("movie_title", "title", "name"):
        if field in dataset.item_feat:
            tokens = dataset.field2id_token[field]
            return " ".join(tokens[t] for t in dataset.item_feat[field][item_id].tolist() if t)
    return ""


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Print the top-k items a trained checkpoint recommends.")
    parser.add_argument("--checkpoint", required=True, help="a .pth file saved by run_recbole_llm.py")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="raw user id: recommend after that user's whole history")
    who.add_argument("--items", help="comma-separated raw item ids, oldest first (sequential models)")
    parser.add_argument("--topk", type=int, default=10, help="how many items (default 10)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from recbole_llm.quick_start import load_data_and_model
    from recbole_llm.utils import create_dataset

    try:
        config, model, *_ = load_data_and_model(args.checkpoint, console_log=False)
        dataset = create_dataset(config)  # unbuilt: every interaction, for the user's history
        user_id = None
        if args.user is not None:
            user_id = _internal_ids(dataset, dataset.uid_field, [args.user])[0]
            history = user_history(dataset, user_id)
        else:
            raw_items = [t.strip() for t in args.items.split(",") if t.strip()]
            if not raw_items:
                raise RecBoleLLMError("--items is empty; give raw item ids separated by commas, oldest first.")
            history = _internal_ids(dataset, dataset.iid_field, raw_items)
        ids, scores = recommend(model, history, args.topk, user_id=user_id)
    except RecBoleLLMError as error:
        print(f"recommend: error: {error}", file=sys.stderr)
        return 2
    if len(ids) < args.topk:
        print(f"recommend: note: only {len(ids)} items are not in the history; listing them all "
              f"(--topk {args.topk}).", file=sys.stderr)
    raw = dataset.field2id_token[dataset.iid_field]
    print(f"top-{len(ids)} of {config['model']} on {config['dataset']}:")
    for rank, (item, score) in enumerate(zip(ids, scores), 1):
        print(f"{rank:>3}  {raw[item]:>8}  {score:9.4f}  {item_title(dataset, item)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
