"""Resident memory of RecBole's data pipeline for one model and protocol, stage by stage, and optionally of the
first training steps and one validation pass.

    python benchmarks/data_memory.py --model DualLLMSASRec --dataset ml-1m-half \
        [--config_files benchmarks/protocols/llmesr_paper.yaml] [--train_steps 5] [--out results/data_memory.md]
        [--key=value ...]

Stages: imports, Config, ``create_dataset`` (the atomic files loaded), ``build()`` (RecBole's prefix augmentation,
then the split; for ``llm_train_mode: all_positions`` the train split is then cut to one row per user). With
``--train_steps N`` the split comes from RecBole's ``data_preparation`` (the dataloaders too), then the model and the
launcher's trainer are built, N training steps run through the trainer's own epoch loop (the first and the last
measured) and one validation pass. For each stage the current and the peak RSS of this process, then the median
seconds of a training step and the rows and bytes of each split's tensors. It says which stage of a training run
sets its peak RSS. glibc's malloc is set as the launcher sets it (``llm_malloc``), so the peak is a launcher run's.
"""
import argparse
import os
import shlex
import statistics
import sys
import time

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


class FirstBatches:
    """The first ``steps`` batches of a dataloader, handed to the trainer's own ``_train_epoch`` so that the measured
    steps are the launcher's (its accumulation, autocast, clipping and schedule). It records the RSS after the
    first batch's step and after the last, and the seconds of each step: from handing out its batch until the
    trainer asks for the next one (the loader's own time left out)."""

    def __init__(self, loader, steps, stages):
        self.loader, self.steps, self.stages = loader, min(steps, len(loader)), stages
        self.step_seconds = []

    def __len__(self):
        return self.steps

    def __getattr__(self, name):  # shuffle, sampler, _dataset: the trainer reads them from the loader
        return getattr(self.loader, name)

    def __iter__(self):
        for step, batch in zip(range(self.steps), self.loader):
            if step == 1:
                self.stages.append(("training step 1", *rss_mb()))
            start = time.perf_counter()
            yield batch
            self.step_seconds.append(time.perf_counter() - start)
        self.stages.append((f"training step {self.steps}", *rss_mb()))


def training_stages(config, data, steps):
    """``(stages, split datasets, seconds of each step)`` of a training run's start: the dataloaders, the model and
    trainer, ``steps`` training steps through the trainer's ``_train_epoch`` and one validation pass, as the
    launcher runs them."""
    from recbole.data import data_preparation

    from recbole_llm.quick_start import _build_trainer
    from recbole_llm.utils import get_model

    train, valid, test = data_preparation(config, data)
    stages = [("build and dataloaders", *rss_mb())]
    model = get_model(config["model"])(config, train._dataset).to(config["device"])
    trainer = _build_trainer(config, model, data, valid, test)
    stages.append(("model and trainer", *rss_mb()))
    batches = FirstBatches(train, steps, stages)
    trainer._train_epoch(batches, epoch_idx=0)
    trainer.evaluate(valid, load_best_model=False)
    stages.append(("validation pass", *rss_mb()))
    return stages, [train._dataset, valid._dataset, test._dataset], batches.step_seconds


def measure(model, dataset, config_files, extra, train_steps=0):
    """``(stages, splits, step seconds)``: ``[(stage, current MB, peak MB)]``, ``[(split, rows, MB, fields)]`` and
    the seconds of each training step (none without ``train_steps``)."""
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
    step_seconds = []
    if train_steps:
        later, built, step_seconds = training_stages(config, data, train_steps)
        stages += later
    else:
        built = data.build()
        stages.append(("build (augmentation, split)", *rss_mb()))
    splits = [(name, *split_sizes(split), ", ".join(split.inter_feat.interaction))
              for name, split in zip(("train", "valid", "test"), built)]
    return stages, splits, step_seconds


def step_time_line(step_seconds):
    """The report's line on the median training step after the first (whose one-off warm-up it leaves out); no line
    with fewer than 2 steps."""
    if len(step_seconds) < 2:
        return []
    later = step_seconds[1:]
    return [f"Training steps 2–{len(step_seconds)}: median {statistics.median(later):.2f} s per step "
            f"(step 1: {step_seconds[0]:.2f} s).", ""]


def report(command, stages, splits, step_seconds=()):
    return "\n".join([
        "# Memory of the data pipeline", "", f"Command: `{command}`", "",
        markdown_table(["stage", "current RSS MB", "peak RSS MB"],
                       [[name, f"{current:,.0f}", f"{peak:,.0f}"] for name, current, peak in stages]), "",
        *step_time_line(list(step_seconds)),
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
    stages, splits, step_seconds = measure(args.model, args.dataset, args.config_files.split(), extra,
                                           args.train_steps)
    text = report(shlex.join(["python", "benchmarks/data_memory.py", *argv]), stages, splits, step_seconds)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
