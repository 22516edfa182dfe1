"""Build a dataset's LLM side data into its cache ahead of training, and print sizes, times and memory.

    python -m recbole_llm.text build --dataset ml-1m-half [--encoder PATH] [--model SASRec]
                                     [--config_files "a.yaml b.yaml"] [--rebuild] [--key=value ...]

It builds the item vectors, the user vectors, the PCA item vectors (to ``hidden_size``) and the similar users
(``llm_similar_users`` each). The users' training histories follow the split of ``--model``'s config (SASRec:
leave-one-out, time order). Any other ``--key=value`` reaches RecBole's Config, as with run_recbole_llm.py.
"""
import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m recbole_llm.text", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build"], help="build: fill the cache of --dataset")
    parser.add_argument("--dataset", "-d", required=True, help="dataset name (a folder under data_path)")
    parser.add_argument("--encoder", default=None, help="llm_encoder: local Hugging Face model folder "
                                                        "(default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--model", "-m", default="SASRec", help="model whose config sets the split (default SASRec)")
    parser.add_argument("--config_files", default=None, help="space-separated YAML files, later ones win")
    parser.add_argument("--rebuild", action="store_true", help="delete this encoder's cache of the dataset first")
    args, _ = parser.parse_known_args(argv)  # the rest reaches RecBole's Config, which reads sys.argv itself
    return args


def _memory_mib():
    """``(current RSS, peak RSS since the last reset)`` in MiB from /proc (Linux); elsewhere both are getrusage's
    peak since the process started."""
    try:
        status = dict(line.split(":", 1) for line in PROC_STATUS.read_text().splitlines())
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def _measured(step):
    """Run ``step()``; return its result, its seconds, and the process's RSS (MiB) before it and at its peak."""
    try:
        PROC_CLEAR_REFS.write_text("5")  # Linux: the peak (VmHWM) restarts from the current RSS
    except OSError:
        pass
    before, start = _memory_mib()[0], time.perf_counter()
    result = step()
    return result, time.perf_counter() - start, before, _memory_mib()[1]


def _report(label, cached, seconds, rss_before, rss_peak):
    """Print one line about a step; return its peak RSS."""
    state = "built" if cached.built else "cached"
    shape = " x ".join(map(str, cached.matrix.shape))
    print(f"{label:<14} {shape:>11}  {state:<6} {seconds:6.1f} s  {cached.entry.size_bytes() / 2 ** 20:6.2f} MiB on "
          f"disk  RSS {rss_before:5.0f} -> peak {rss_peak:5.0f} MiB  {cached.entry.matrix_file}", flush=True)
    return rss_peak


def build(args):
    """Fill the cache of ``args.dataset``; print one line per entry."""
    from recbole_llm.config import Config
    from recbole_llm.text.side_data import SideData
    from recbole_llm.utils import create_dataset

    config_dict = {"show_progress": True, **({"llm_encoder": args.encoder} if args.encoder else {})}
    config_files = args.config_files.split() if args.config_files else None
    config = Config(model=args.model, dataset=args.dataset, config_file_list=config_files, config_dict=config_dict)
    dataset = create_dataset(config)
    side = SideData(config)
    if args.rebuild:
        shutil.rmtree(side.folder, ignore_errors=True)
    encoder = side.encoder
    print(f"dataset {args.dataset}: {dataset.user_num - 1} users, {dataset.item_num - 1} items, "
          f"{len(dataset.inter_feat)} interactions; encoder {encoder.path} ({encoder.pooling} pooling, "
          f"{encoder.max_tokens} tokens); cache {side.folder}", flush=True)
    steps = (("items", side.items), ("users", lambda: side.users(dataset)),
             (f"PCA {config['hidden_size']}", lambda: side.pca(config["hidden_size"])),
             ("similar users", lambda: side.similar(dataset)))
    # Each step restarts the kernel's peak counter, so the process's peak is the largest step peak.
    peaks = [_report(label, *_measured(step)) for label, step in steps]
    print(f"process peak RSS {max(peaks):.0f} MiB")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from recbole_llm.utils import RecBoleLLMError

    try:
        build(args)
    except RecBoleLLMError as error:
        print(f"python -m recbole_llm.text: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
