"""Resident memory of RecBole's data pipeline for one model and protocol, stage by stage, and optionally of the
first training steps and one validation pass.

    python benchmarks/data_memory.py --model DualLLMSASRec --dataset ml-1m-half \
        [--config_files benchmarks/protocols/llmesr_paper.yaml] [--train_steps 5] [--out results/data_memory.md]
        [--key=value ...]

Stages: imports, Config, ``create_dataset`` (the atomic files loaded), ``build()`` (RecBole's prefix augmentation,
then the split; for ``llm_train_mode: all_positions`` the train split is then cut to one row per user). With
``--train_steps N`` the split comes from RecBole's ``data_preparation`` (the dataloaders too), then the model and the
launcher's trainer are built, N training steps run (the first and the last measured) and one validation pass. For
each stage the current and the peak RSS of this process, then the rows and bytes of each split's tensors. It says
which stage of a training run sets its peak RSS. glibc's malloc is set as the launcher sets it
(``llm_malloc``), so the peak is a launcher run's.
"""
import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import config_argv, markdown_table, peak_rss_mb, require_key_values, write_text_atomic  # noqa: E402


def rss_mb():
    """``(current, peak)`` resident set size of this process in MB (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        current = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return current / 1024, peak_rss_mb()  # /proc reports KiB


def split_sizes(split):
    """``(rows, MB)`` of a split's interaction tensors."""
    tensors = split.inter_feat.interaction.values()
    return len(split.inter_feat), sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def training_stages(config, data, steps):
    """``(stages, split datasets)`` of a training run's start: the dataloaders, the model and trainer, ``steps``
    training steps and one validation pass, as the launcher runs them."""
    from recbole.data import data_preparation

    from recbole_llm.quick_start import _build_trainer
    from recbole_llm.utils import get_model

    train, valid, test = data_preparation(config, data)
    stages = [("build and dataloaders", *rss_mb())]
    model = get_model(config["model"])(config, train._dataset).to(config["device"])
    trainer = _build_trainer(config, model, data, valid, test)
    stages.append(("model and trainer", *rss_mb()))
    model.train()
    for step, batch in zip(range(steps), train):
        losses = model.calculate_loss(batch)
        trainer.optimizer.zero_grad()
        (sum(losses) if isinstance(losses, tuple) else losses).backward()
        trainer.optimizer.step()
        if step in (0, steps - 1):
            stages.append((f"training step {step + 1}", *rss_mb()))
    trainer.evaluate(valid, load_best_model=False)
    stages.append(("validation pass", *rss_mb()))
    return stages, [train._dataset, valid._dataset, test._dataset]


def measure(model, dataset, config_files, extra, train_steps=0):
    """``(stages, splits)``: ``[(stage, current MB, peak MB)]`` and ``[(split, rows, MB, fields)]``."""
    stages = [("interpreter", *rss_mb())]
    import recbole_llm  # noqa: F401  (compat fixes, as the launcher applies them)
    from recbole_llm.config import Config
    from recbole_llm.quick_start import set_malloc
    from recbole_llm.utils import create_dataset

    stages.append(("imports", *rss_mb()))
    with config_argv(extra):
        config = Config(model=model, dataset=dataset, config_file_list=config_files, config_dict={"state": "ERROR"})
    set_malloc(config)  # the launcher's malloc settings, which decide how much freed memory the RSS keeps
    stages.append(("Config", *rss_mb()))
    data = create_dataset(config)
    stages.append(("create_dataset", *rss_mb()))
    if train_steps:
        later, built = training_stages(config, data, train_steps)
        stages += later
    else:
        built = data.build()
        stages.append(("build (augmentation, split)", *rss_mb()))
    splits = [(name, *split_sizes(split), ", ".join(split.inter_feat.interaction))
              for name, split in zip(("train", "valid", "test"), built)]
    return stages, splits


def report(command, stages, splits):
    return "\n".join([
        "# Memory of the data pipeline", "", f"Command: `{command}`", "",
        markdown_table(["stage", "current RSS MB", "peak RSS MB"],
                       [[name, f"{current:,.0f}", f"{peak:,.0f}"] for name, current, peak in stages]), "",
        markdown_table(["split", "rows", "tensor MB", "fields"],
                       [[name, f"{rows:,}", f"{mb:,.1f}", fields] for name, rows, mb, fields in splits]), ""])


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Any other --key=value reaches RecBole's Config.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--config_files", default="", help="space-separated YAML files")
    parser.add_argument("--train_steps", type=int, default=0,
                        help="also measure the model, this many training steps and one validation pass")
    parser.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    args, extra = parser.parse_known_args(argv)
    require_key_values(parser, extra)
    stages, splits = measure(args.model, args.dataset, args.config_files.split(), extra, args.train_steps)
    text = report(shlex.join(["python", "benchmarks/data_memory.py", *argv]), stages, splits)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
