"""HLLM, SLMRec and RecLoRA at real shapes with random weights: a few training steps each on one CUDA GPU.

    python benchmarks/gpu_check.py [--steps 20] [--shapes real|tiny] [--out results/gpu_check.md]

Three checks, each through the plugin's own pipeline (Config, create_dataset, the model, its LLMTrainer-based
trainer's ``fit``) on RecBole's bundled ml-100k:

- HLLM end to end: item and user LLM both of the TinyLlama-1.1B shape, both training, bf16 autocast and gradient
  checkpointing in both;
- SLMRec: a Llama-2-7B-shape backbone of 8 layers; the 8-layer teacher is saved untrained (its LoRA at zero: the
  cost of distillation does not depend on what the teacher learned) and the 4-layer student trains distilled from
  it over 4 blocks; the item table comes from a one-epoch SASRecAP run;
- RecLoRA: a Llama-2-7B-shape causal LM of 4 layers, 16 meta-LoRAs on q/v gated by a DIN CRM trained one epoch on
  the CTR samples (the ages and occupations of ml-100k's users re-coded to ml-1m's codes, which the prompt reads).

The LLMs go into a temporary folder at the depth kept (a 7B shape never allocates its 32 layers) with a small BPE
tokenizer built here (Llama-style pieces, ``<s>`` first; no Llama tokenizer is available offline; the vocabulary of
32,000 is larger than the tokenizer's, which only leaves rows unused): SLMRec's and RecLoRA's as random bf16 weights
(both load their frozen LLM in bf16), HLLM's as a config that HLLM initialises itself (``hllm_*_llm_pretrained:
False``, the official ``*_llm_init: False``), in fp32 master weights under bf16 autocast. Each check runs
``--steps`` optimizer steps of one batch (``llm_grad_accum_steps`` 1) at a constant learning rate (the official
warm-ups are longer than the check) and reports the peak GPU memory (``torch.cuda.max_memory_allocated`` from the
model build on, reset per check), the mean step time after the first step, samples and tokens per second, and
whether the loss fell from the first step to the last. A check that fails (out of memory, say) is reported in its
row and the others still run. The table goes to ``--out`` and to stdout.

``--shapes real`` (default) needs CUDA: without it the script says so and exits 0. ``--shapes tiny`` swaps in
Llama configs of width 64 (2 layers; SLMRec's teacher 4 and student 2), a small DIN and the first 100 users of
ml-100k, and runs on the CPU, as the test does.
"""
import argparse
import datetime
import gc
import os
import shlex
import shutil
import statistics
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import compare

NO_CUDA = "no CUDA device: gpu_check needs one GPU; nothing run"
REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = REPO / "benchmarks" / "protocols"

TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 32000, "max_position_embeddings": 512}


@dataclass(frozen=True)
class Shapes:
    """The sizes of one ``--shapes`` choice."""

    tower_name: str
    tower: dict            # LlamaConfig sizes of both HLLM LLMs, layers included
    backbone_name: str
    backbone: dict         # LlamaConfig sizes of the SLMRec and RecLoRA LLMs, without the layers
    teacher_layers: int
    student_layers: int
    blocks: int            # slmrec_distill_blocks: divides both depths
    reclora_layers: int
    crm: dict              # DIN's sizes
    users: int | None = None  # only the interactions of ml-100k's users 1..N (None = all)


SHAPES = {
    "real": Shapes("TinyLlama-1.1B", TINYLLAMA, "Llama-2-7B", LLAMA2_7B, 8, 4, 4, 4,
                   {"embedding_size": 64, "mlp_hidden_size": [256, 256, 256], "dropout_prob": 0.1}),
    "tiny": Shapes("tiny", {**TINY, "num_hidden_layers": 2}, "tiny", TINY, 4, 2, 2, 2,
                   {"embedding_size": 8, "mlp_hidden_size": [16, 16]}, users=100),
}

# ml-100k's users as ml-1m codes, which ReLLa's prompt reads: age brackets (upper bounds) and occupations.
AGE_CODES = ((18, "1"), (25, "18"), (35, "25"), (45, "35"), (50, "45"), (56, "50"))  # 56 and over: "56"
JOB_CODES = {"administrator": "3", "artist": "2", "doctor": "6", "educator": "1", "engineer": "17",
             "executive": "7", "healthcare": "6", "homemaker": "9", "lawyer": "11", "marketing": "14",
             "programmer": "12", "retired": "13", "salesman": "14", "scientist": "15", "student": "4",
             "technician": "17", "writer": "20"}  # the rest (entertainment, librarian, none, other): "0"
INTER_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
CTR_COLUMNS = {"inter": INTER_COLUMNS,
               "user": ["user_id", "age", "gender", "occupation", "zip_code"],
               "item": ["item_id", "movie_title", "release_year"]}
CTR_ROWS = {"reclora_valid_samples": 1000, "reclora_test_samples": 1000}  # DIN's evaluation; RecLoRA runs none
# The copy's own name: for "ml-100k" RecBole reads its bundled files whatever data_path says, with presets of its own.
DATASET = "ml-100k-check"
N_META = 16  # RecLoRA's meta-LoRAs per module (official ml-1m)


# ---------------------------------------------------------------- data, tokenizer and random models

def write_ml100k(data_path, users=None):
    """RecBole's bundled ml-100k as ``data_path/DATASET`` (with ``users``, the interactions of users 1..users only),
    its users' ages and occupations as ml-1m codes."""
    import recbole

    source, target = Path(recbole.__file__).parent / "dataset_example" / "ml-100k", Path(data_path) / DATASET
    target.mkdir(parents=True)
    shutil.copy(source / "ml-100k.item", target / f"{DATASET}.item")
    header, *rows = (source / "ml-100k.inter").read_text(encoding="utf-8").splitlines()
    kept = [row for row in rows if users is None or int(row.split("\t", 1)[0]) <= users]
    (target / f"{DATASET}.inter").write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")
    header, *rows = (source / "ml-100k.user").read_text(encoding="utf-8").splitlines()
    lines = [header]
    for row in rows:
        user, age, gender, job, zip_code = row.split("\t")
        age = next((code for bound, code in AGE_CODES if int(age) < bound), "56")
        lines.append("\t".join([user, age, gender, JOB_CODES.get(job, "0"), zip_code]))
    (target / f"{DATASET}.user").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tokenizer(data_path):
    """A Llama-style tokenizer (``▁`` word pieces, digits split, ``<s>`` first) with BPE learnt from the item file
    and the three models' YAML (their prompts), plus ReLLa's prompt and its answers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    from recbole_llm.data.ctr import ANSWERS, render_prompt

    corpus = (Path(data_path) / DATASET / f"{DATASET}.item").read_text(encoding="utf-8").splitlines()
    for model in ("HLLM", "SLMRec", "RecLoRA"):
        corpus += (REPO / "properties" / "model" / f"{model}.yaml").read_text(encoding="utf-8").splitlines()
    corpus += [render_prompt("male", "writer", "35-44", [("Heat (1995)", 4)], "Balto (1995)"), *ANSWERS.values()]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(),
                                                       pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=8000, initial_alphabet=list(string.printable),
                                                              special_tokens=["<unk>", "<s>", "</s>"]))
    return LlamaTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              add_bos_token=True, add_eos_token=False)


def write_llama(folder, sizes, layers, tokenizer, weights=None, device="cpu"):
    """A Llama of ``sizes`` with ``layers`` layers in ``folder`` with ``tokenizer``: its config only
    (``weights=None``), or random bf16 weights, initialised on ``device``, of a base model (``base``) or a causal LM
    (``causal``)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**sizes | {"num_hidden_layers": layers})
    if weights is None:
        config.save_pretrained(folder)
    else:
        with torch.device(device):
            auto = AutoModelForCausalLM if weights == "causal" else AutoModel
            auto.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------- measuring steps

class Steps:
    """A training loader seen as ONE batch per epoch, the next one of the loader each time (round and round), so
    that ``fit`` over ``epochs`` = steps makes one optimizer step an epoch and RecBole's ``train_loss_dict`` keeps
    each step's loss. It times each step (the batch fetched, trained and stepped, after a CUDA sync) and counts its
    samples and the tokens (attention-mask ones) entering the model's LLMs."""

    def __init__(self, loader, model, device):
        import torch

        self.loader, self.batches = loader, self._cycle(loader)
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
        self.seconds, self.samples, self.tokens, self._masks = [], [], [], []
        for llm in model.llm_modules():
            llm.register_forward_pre_hook(lambda module, args, kwargs: self._masks.append(
                kwargs["attention_mask"].sum()), with_kwargs=True)

    @staticmethod
    def _cycle(loader):
        while True:
            yield from loader

    def __len__(self):
        return 1

    def __getattr__(self, name):  # everything else (the dataset, the sampler) is the loader's
        return getattr(self.loader, name)

    def __iter__(self):
        self.sync()
        start = time.perf_counter()
        batch = next(self.batches)
        yield batch
        self.sync()
        self.seconds.append(time.perf_counter() - start)
        self.samples.append(len(batch))
        self.tokens.append(int(sum(self._masks)))
        self._masks.clear()


def prepared(config_dict, config_files=()):
    """``(config, training loader)`` of a config dict, seeded as RecBole's runs are."""
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_llm.config import Config
    from recbole_llm.utils import create_dataset

    config = Config(config_dict=config_dict, config_file_list=[str(path) for path in config_files])
    init_seed(config["seed"], config["reproducibility"])
    train_data, _, _ = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    return config, train_data


def train_steps(config_dict, config_files=()):
    """Train ``config_dict['epochs']`` one-batch epochs with the model's trainer; the measurements."""
    import torch

    from recbole_llm.utils import get_model, get_trainer

    config, train_data = prepared(config_dict, config_files)
    cuda = torch.device(config["device"]).type == "cuda"
    if cuda:
        gc.collect()  # what the set-up left behind (a model written to disk) is not this check's memory
        torch.cuda.reset_peak_memory_stats()
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    steps = Steps(train_data, model, config["device"])
    trainer.fit(steps, verbose=False, saved=False)
    losses = [trainer.train_loss_dict[epoch] for epoch in range(config["epochs"])]
    timed = slice(1, None)  # the first step warms up
    seconds = sum(steps.seconds[timed])
    return {"s_per_step": statistics.mean(steps.seconds[timed]), "samples_per_s": sum(steps.samples[timed]) / seconds,
            "tokens_per_s": sum(steps.tokens[timed]) / seconds, "batch": steps.samples[0],
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            "first_loss": losses[0], "last_loss": losses[-1]}


def quiet_run(config_dict, config_files, name):
    """A quiet ``objective_function`` run that keeps its best model as ``checkpoint_dir/name``; that path."""
    from recbole_llm.quick_start import objective_function

    objective_function({**config_dict, "llm_checkpoint_name": name}, [str(path) for path in config_files])
    return os.path.join(config_dict["checkpoint_dir"], name)


# ---------------------------------------------------------------- the three checks

def device_of(base):
    return "cuda" if base["use_gpu"] else "cpu"


def check_hllm(work, base, shapes, tokenizer):
    """HLLM end to end: both LLMs of the tower shape, randomly initialised, training, checkpointed."""
    folder = write_llama(work / "tower", shapes.tower, shapes.tower["num_hidden_layers"], tokenizer)
    return train_steps({**base, "model": "HLLM", "hllm_item_llm": folder, "hllm_user_llm": folder,
                        "hllm_item_llm_pretrained": False, "hllm_user_llm_pretrained": False,
                        "hllm_freeze_item_llm": False, "hllm_item_num_layers": None, "hllm_user_num_layers": None,
                        "llm_gradient_checkpointing": True, "learning_rate": 1e-4, "train_batch_size": 8})


def check_slmrec(work, base, shapes, tokenizer):
    """SLMRec's student distilled from the saved, untrained teacher over a backbone of the teacher's depth."""
    import torch

    from recbole_llm.model.sequential_recommender.slmrec import SLMRec

    sasrec = quiet_run({**base, "model": "SASRecAP", "epochs": 1}, [PROTOCOLS / "slmrec_sasrec.yaml"], "sasrec.pth")
    folder = write_llama(work / "backbone", shapes.backbone, shapes.teacher_layers, tokenizer, "base", device_of(base))
    keys = {**base, "model": "SLMRec", "slmrec_backbone": folder, "slmrec_item_emb_checkpoint": sasrec,
            "slmrec_dtype": "bfloat16"}
    config, train_data = prepared({**keys, "slmrec_n_layers": shapes.teacher_layers})
    teacher = str(work / "teacher.pth")
    torch.save({"config": config, "state_dict": SLMRec(config, train_data._dataset).state_dict()}, teacher)
    return train_steps({**keys, "slmrec_n_layers": shapes.student_layers, "slmrec_distill": True,
                        "slmrec_distill_blocks": shapes.blocks, "slmrec_teacher_checkpoint": teacher})


def check_reclora(work, base, shapes, tokenizer):
    """RecLoRA with N_META meta-LoRAs gated by a one-epoch DIN, on a causal LM of the backbone shape."""
    protocol = [PROTOCOLS / "ctr_rella.yaml"]
    ctr = {**base, "load_col": CTR_COLUMNS, **CTR_ROWS}
    crm = quiet_run({**ctr, "model": "DIN", **shapes.crm, "epochs": 1, "train_batch_size": 2048,
                     "eval_batch_size": 4096, "learning_rate": 1e-3}, protocol, "crm.pth")
    folder = write_llama(work / "causal", shapes.backbone, shapes.reclora_layers, tokenizer, "causal", device_of(base))
    return train_steps({**ctr, "model": "RecLoRA", "reclora_llm": folder, "reclora_crm_checkpoint": crm,
                        "reclora_crm_dim": shapes.crm["mlp_hidden_size"][-1], "reclora_n_meta": N_META,
                        "reclora_train_samples": None}, protocol)


def checks(shapes):
    """``[(name, what it runs, check function)]``."""
    tower, backbone = shapes.tower, shapes.backbone
    width = f"width {backbone['hidden_size']}"
    return [
        ("HLLM", f"item + user LLM, {shapes.tower_name} shape ({tower['num_hidden_layers']} layers, width "
                 f"{tower['hidden_size']}), both training; checkpointing", check_hllm),
        ("SLMRec", f"{shapes.backbone_name} shape ({width}): student {shapes.student_layers} layers distilled from "
                   f"a {shapes.teacher_layers}-layer teacher, {shapes.blocks} blocks", check_slmrec),
        ("RecLoRA", f"{shapes.backbone_name} shape ({width}), {shapes.reclora_layers} layers, {N_META} meta-LoRAs "
                    f"on q/v", check_reclora),
    ]


def run_check(function, work, base, shapes, tokenizer):
    """``(measurements, None)``, or ``(None, error line)`` when the check fails; its files and memory are freed."""
    import torch

    work.mkdir()
    try:
        return function(work, base, shapes, tokenizer), None
    except Exception as error:  # any failure (out of memory included) is this check's row; the others still run
        return None, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- report

HEADER = ["check", "what runs", "samples/step", "s/step", "samples/s", "tokens/s", "peak GPU GiB", "first loss",
          "last loss", "loss falls"]


def row(name, what, result, error):
    if error:
        return [name, what, f"failed: {error}"] + ["—"] * (len(HEADER) - 3)
    peak = "—" if result["peak_gib"] is None else f"{result['peak_gib']:.1f}"
    return [name, what, result["batch"], f"{result['s_per_step']:.3f}", f"{result['samples_per_s']:.1f}",
            f"{result['tokens_per_s']:.0f}", peak, f"{result['first_loss']:.4f}", f"{result['last_loss']:.4f}",
            "yes" if result["last_loss"] < result["first_loss"] else "no"]


def render(command, machine, args, shapes, rows):
    import peft
    import torch
    import transformers

    users = f", the interactions of users 1-{shapes.users} only" if shapes.users else ""
    return "\n".join([
        f"# GPU check: HLLM, SLMRec and RecLoRA, {args.shapes} shapes, random weights", "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Device: {machine}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"python {sys.version.split()[0]}",
        f"- Data: RecBole's bundled ml-100k{users}, its users' ages and occupations re-coded to ml-1m's codes for "
        f"RecLoRA's prompt.",
        f"- Each check: {args.steps} optimizer steps of one batch (llm_grad_accum_steps 1), llm_dtype bf16, a "
        f"constant learning rate, random weights, no evaluation.",
        "- s/step: the mean over the steps after the first, each timed from fetching its batch to the end of the "
        "optimizer step (after a CUDA sync). tokens/s: the attention-mask tokens entering the model's LLMs (both "
        "HLLM LLMs; SLMRec's student, not its frozen teacher), cut by this script's small tokenizer, not Llama's.",
        "- peak GPU: torch.cuda.max_memory_allocated from the model build to the last step. Loss: the trained "
        "objective (SLMRec's: CE plus the distillation terms); it falls when the last step's is below the first's "
        "(each step has its own batch).", "",
        compare.markdown_table(HEADER, rows), ""])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per check, at least 2 (default 20)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="real",
                        help="real (needs CUDA) or tiny (width 64, on the CPU)")
    parser.add_argument("--out", help="Markdown file (default results/gpu_check.md; results/gpu_check-tiny.md for "
                                      "tiny shapes, so that a CPU run never replaces a GPU result)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step warms up")
    args.out = args.out or os.path.join("results", "gpu_check.md" if args.shapes == "real" else "gpu_check-tiny.md")
    return args


def main(argv):
    args = parse_args(argv)
    import torch

    if args.shapes == "real" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    use_gpu = args.shapes == "real"
    machine = f"{torch.cuda.get_device_name()} (CUDA)" if use_gpu else "CPU"
    shapes = SHAPES[args.shapes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:
        work = Path(folder)
        write_ml100k(work / "data", shapes.users)
        tokenizer = build_tokenizer(work / "data")
        base = {"dataset": DATASET, "data_path": str(work / "data"), "checkpoint_dir": str(work / "saved"),
                "load_col": {"inter": INTER_COLUMNS}, "use_gpu": use_gpu, "state": "ERROR", "show_progress": False,
                "seed": 2020, "epochs": args.steps, "llm_dtype": "bf16", "llm_grad_accum_steps": 1,
                "llm_lr_scheduler": "constant", "llm_warmup_steps": None, "llm_warmup_ratio": 0.0}
        for name, what, function in checks(shapes):
            result, error = run_check(function, work / name, base, shapes, tokenizer)
            rows.append(row(name, what, result, error))
            print(f"{name}: {error or 'ok'}", flush=True)
    report = render(shlex.join(["python", "benchmarks/gpu_check.py", *argv]), machine, args, shapes, rows)
    compare.write_text_atomic(args.out, report)
    print("\n" + report + f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
