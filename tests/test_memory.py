"""Peak RSS of `tvedit add` does not grow with model size (the real figures are in benchmarks/)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _measure import measure  # noqa: E402

TENSOR = 2 * 1024 * 1024  # 8 MiB float32 tensors: the largest tensor is the same in both models


def _model(dir: Path, n_tensors: int, n_inputs: int) -> list[str]:
    dir.mkdir()
    base = {f"t{i:03d}": torch.full((TENSOR,), float(i)) for i in range(n_tensors)}
    save_file(base, str(dir / "base.safetensors"))
    files = []
    for j in range(n_inputs):
        save_file({k: v + j + 1 for k, v in base.items()}, str(dir / f"ft{j}.safetensors"))
        files.append(str(dir / f"ft{j}.safetensors"))
    return files


def test_peak_rss_independent_of_model_size(tmp_path: Path) -> None:
    results = {}
    for name, n_tensors in (("small", 4), ("large", 20)):  # 32 MiB vs 160 MiB per file, 3 inputs + base
        files = _model(tmp_path / name, n_tensors, 3)
        base = str(tmp_path / name / "base.safetensors")
        cmd = [sys.executable, "-m", "tvedit", "add", *files, "--base", base, "--alpha", "0.5", "-o", str(tmp_path / name / "out.safetensors")]
        results[name] = measure(cmd)["peak_rss_mib"]
    growth = results["large"] - results["small"]
    # a load-everything implementation would grow by ~4 x 128 MiB here; streaming holds (N+2) tensors
    print(results)
    assert growth < 48, results
