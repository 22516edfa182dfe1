"""Items per second of HLLM's item LLM: embedding under ``no_grad`` (a frozen table, an evaluation), and a forward
plus backward pass (an end-to-end training step's item side).

    python benchmarks/hllm_item_throughput.py --dataset ml-1m-half [--items 512] [--train_batch 64] [--key=value ...]

Any ``--key=value`` reaches the Config (e.g. ``--hllm_item_llm=<folder>``, ``--hllm_max_text_length=256``). The
items are a random sample of the dataset's, the same for both measurements; the item LLM is HLLM's own
(``recbole_llm.model.hllm_layers.ItemLLM``), with the [ITEM] vector. Prints one Markdown table.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(item_llm, items, batch_size, train):
    """Items per second over ``items`` in batches of ``batch_size``; with ``train``, forward and backward."""
    import torch

    item_llm.train(train)
    start = time.perf_counter()
    for batch in items.split(batch_size):
        if train:
            item_llm(batch).sum().backward()
        else:
            with torch.no_grad():
                item_llm(batch)
    return len(items) / (time.perf_counter() - start)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--items", type=int, default=512, help="items sampled (default 512)")
    parser.add_argument("--train_batch", type=int, default=64, help="items per forward+backward (default 64)")
    args, _ = parser.parse_known_args(argv)  # --key=value reaches Config through sys.argv

    import torch
    from recbole.utils import init_seed

    from recbole_llm.config import Config
    from recbole_llm.model.hllm_layers import ItemLLM
    from recbole_llm.utils import create_dataset

    config = Config(model="HLLM", dataset=args.dataset, config_dict={"hllm_item_pooling": "item"})
    init_seed(config["seed"], True)
    item_llm = ItemLLM(config, create_dataset(config)).to(config["device"])
    items = torch.randperm(len(item_llm.token_ids) - 1, device=config["device"])[: args.items] + 1
    tokens = item_llm.token_mask[items].sum(1).float().mean().item()
    eval_rate = measure(item_llm, items, config["hllm_item_batch_size"], train=False)
    train_rate = measure(item_llm, items, args.train_batch, train=True)
    print(f"| item LLM | layers | tokens per item (mean, with [ITEM]) | embed items/s (batch "
          f"{config['hllm_item_batch_size']}, no_grad) | train items/s (batch {args.train_batch}, fwd+bwd) | "
          f"threads |\n| --- | --- | --- | --- | --- | --- |\n"
          f"| {config['hllm_item_llm'] or 'all-MiniLM-L6-v2'} | {item_llm.llm.config.num_hidden_layers} | "
          f"{tokens:.1f} | {eval_rate:.1f} | {train_rate:.1f} | {torch.get_num_threads()} |")


if __name__ == "__main__":
    main(sys.argv[1:])
