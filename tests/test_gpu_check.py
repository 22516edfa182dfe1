"""benchmarks/gpu_check.py: the three checks end to end at tiny shapes on the CPU, and the exit without CUDA."""
import importlib.util

import torch

from conftest import REPO_ROOT, run_python

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def load_script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports compare.py beside it
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text):
    """``{check: {column: cell}}`` of the report's table."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["check"]: row for row in rows}


def test_tiny_shapes_run_all_three_checks_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = run_python([str(SCRIPT), "--shapes", "tiny", "--steps", "2", "--out", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text(encoding="utf-8")
    assert report.strip() in done.stdout
    assert "Command: `python benchmarks/gpu_check.py --shapes tiny --steps 2" in report and "Device: CPU" in report
    rows = table_rows(report)
    assert list(rows) == ["HLLM", "SLMRec", "RecLoRA"]
    for row in rows.values():
        assert float(row["s/step"]) > 0 and float(row["samples/s"]) > 0 and float(row["tokens/s"]) > 0
        assert row["loss falls"] in ("yes", "no")
        assert float(row["first loss"]) > 0 and float(row["last loss"]) > 0
        assert row["peak GPU GiB"] == "—"
    assert rows["HLLM"]["samples/step"] == "8" and rows["SLMRec"]["samples/step"] == "32"
    assert not list(tmp_path.glob("*.tmp"))


def test_without_cuda_the_real_shapes_exit_0_and_say_so(tmp_path, monkeypatch, capsys):
    gpu_check = load_script(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == gpu_check.NO_CUDA
    assert not out.exists()


def test_a_failing_check_gets_its_own_row_and_its_folder_is_removed(tmp_path, monkeypatch):
    gpu_check = load_script(monkeypatch)

    def out_of_memory(work, base, shapes, tokenizer):
        (work / "weights.bin").write_bytes(b"0")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    result, error = gpu_check.run_check(out_of_memory, tmp_path / "HLLM", {}, None, None)
    assert result is None and error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert not (tmp_path / "HLLM").exists()
    cells = gpu_check.row("HLLM", "what", None, error)
    assert cells[2] == f"failed: {error}" and cells[3:] == ["—"] * (len(gpu_check.HEADER) - 3)
