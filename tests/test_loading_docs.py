"""docs/loading.md: its code blocks, run as they are in a Python where `import tvedit` fails, load
tvedit outputs of tiny models into plain open_clip and transformers models, parameter for parameter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "loading.md"
CHECK = """
import torch
from safetensors.torch import load_file
stored = load_file(path)
state = model.state_dict()
assert set(stored) <= set(state), sorted(set(stored) - set(state))[:3]
for k, v in stored.items():
    assert torch.equal(state[k], v), k
for k in set(state) - set(stored):  # tied weights (stored once): equal to the tensor they share
    assert any(torch.equal(state[k], v) for v in stored.values()), k
print("loaded", type(model).__name__, len(stored), "tensors")
"""


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _run_without_tvedit(block: str, cwd: Path) -> str:
    code = "import sys\nsys.modules['tvedit'] = None  # no tvedit here\n" + block + CHECK
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_open_clip_block(tmp_path: Path) -> None:
    from tests.test_evaluate import TINY
    from tvedit import arith
    from tvedit.manifest import Manifest
    from tvedit.models.open_clip import OpenClipAdapter
    from tvedit.writer import save_tensors

    adapter = OpenClipAdapter("tiny", TINY)
    torch.manual_seed(0)
    state = adapter.state_dict(adapter.build())
    save_tensors(tmp_path / "base.safetensors", state, Manifest(kind="checkpoint", model=adapter.model_info()))
    g = torch.Generator().manual_seed(1)
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    save_tensors(tmp_path / "ft.safetensors", ft, Manifest(kind="checkpoint", model=adapter.model_info()))
    arith.add([tmp_path / "ft.safetensors"], tmp_path / "merged.safetensors", base=tmp_path / "base.safetensors", alpha=0.5)
    (block,) = [b for b in _blocks() if "open_clip" in b]
    assert "loaded CLIP" in _run_without_tvedit(block, tmp_path)


def test_transformers_block(tmp_path: Path) -> None:
    from tests.tiny_t5 import write_tiny_t5
    from tvedit import arith
    from tvedit.finetune import run

    write_tiny_t5(tmp_path / "tiny-t5")
    run.init(str(tmp_path / "tiny-t5"), None, tmp_path / "theta0.safetensors")
    arith.add([tmp_path / "theta0.safetensors"], tmp_path / "merged.safetensors", base=tmp_path / "theta0.safetensors", alpha=0.5)
    (block,) = [b for b in _blocks() if "transformers" in b]
    assert "loaded T5ForConditionalGeneration" in _run_without_tvedit(block, tmp_path)
