"""Every error a user can cause is one line with a documented exit code (issue 16, section 2).

Each row runs the real CLI in a subprocess (stdout and stderr are pipes, as in CI) and asserts:
exactly one stderr line, no traceback, no escape bytes or box-drawing characters, the documented
exit code, and nothing new in the working (output) directory or the scratch directory.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tvedit.errors import EXIT_CODES
from tvedit.manifest import METADATA_KEY
from tvedit.reader import open_checkpoint

from .conftest import make_state, perturb

pytestmark = pytest.mark.slow  # ~30 CLI processes (about 2 s each on an idle 2-core machine)

BOX = set("─│╭╮╰╯┌┐└┘├┤┬┴┼━┃")
PY = f"{sys.executable} -m tvedit"

# (id, shell command run in the work directory, expected exit code)
CASES = [
    # outputs that cannot be written (exit 6)
    ("o-missing-proc-dir", f"{PY} add tv1.safetensors -o /proc/nope/x.safetensors", 6),
    ("o-unwritable-sys", f"{PY} add tv1.safetensors -o /sys/x.safetensors", 6),
    ("scratch-unusable", f"TVEDIT_SCRATCH=/proc/x {PY} extract ft1.safetensors -b base.safetensors | cat; exit ${{PIPESTATUS[0]}}", 6),
    ("o-missing-dir", f"{PY} add tv1.safetensors -o missing_dir/x.safetensors", 6),
    ("o-missing-root-dir", f"{PY} add tv1.safetensors -o /nonexistent_dir_tvedit/x.safetensors", 6),
    ("out-dir-missing-parent", f"{PY} scale tv1.safetensors --by 2 --out-dir missing_dir/sub", 6),
    ("extract-o-missing-dir", f"{PY} extract ft1.safetensors -b base.safetensors -o missing_dir/tv.safetensors", 6),
    ("import-o-missing-dir", f"{PY} import state.pt -o missing_dir/x.safetensors", 6),
    ("full-disk", f"{PY} extract ft1.safetensors -b base.safetensors -o full.safetensors", 6),  # RLIMIT_FSIZE: EFBIG
    # recipes (exit 2: a recipe holds option values)
    ("recipe-alpha-abc", f"{PY} add alpha_abc.yaml -o x.safetensors", 2),
    ("recipe-alpha-nan", f"{PY} add alpha_nan.yaml -o x.safetensors", 2),
    ("recipe-weight-abc", f"{PY} add weight_abc.yaml -o x.safetensors", 2),
    ("recipe-weight-inf", f"{PY} add weight_inf.yaml -o x.safetensors", 2),
    ("recipe-base-number", f"{PY} add base_number.yaml -o x.safetensors", 2),
    ("mergekit-weight-nan", f"{PY} add mergekit_nan.yaml -o x.safetensors", 2),
    # errors the argument parser finds (exit 2, one line, no panel)
    ("alpha-abc", f"{PY} add tv1.safetensors --alpha abc -o x.safetensors", 2),
    ("missing-base", f"{PY} extract ft1.safetensors -o x.safetensors", 2),
    ("no-inputs", f"{PY} add -o x.safetensors", 2),
    ("unknown-option", f"{PY} add tv1.safetensors --bogus -o x.safetensors", 2),
    ("unknown-command", f"{PY} bogus", 2),
    ("int-option-abc", f"{PY} compress tv1.safetensors --rank abc -o x.safetensors", 2),
    # non-finite numbers (exit 2 before any file is read)
    ("alpha-nan", f"{PY} add tv1.safetensors --alpha nan -o x.safetensors", 2),
    ("by-inf", f"{PY} scale tv1.safetensors --by inf -o x.safetensors", 2),
    ("weights-nan", f"{PY} add tv1.safetensors tv2.safetensors --weights 1,nan -o x.safetensors", 2),
    ("density-nan", f"{PY} mask topk tv1.safetensors --density nan -o x.safetensors", 2),
    ("lambda-inf", f"{PY} mask tall tv1.safetensors tv2.safetensors --lambda inf --out-dir masked", 2),
    ("option-lambda-inf", f"{PY} add tv1.safetensors tv2.safetensors --method consensus --option lambda=.inf -o x.safetensors", 2),
    ("option-density-nan", f"{PY} add tv1.safetensors tv2.safetensors --method ties --option density=.nan -o x.safetensors", 2),
    ("lr-inf", f"{PY} finetune --model m --train t --output x.safetensors --lr inf", 2),
    # inputs (exit 3): a pickle that needs --trust-pickle (torch's message carries bold escapes)
    ("pickle-refused", f"{PY} import state.pt -o x.safetensors", 3),
    ("hostile-header", f"{PY} add hostile.safetensors -o x.safetensors", 3),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("matrix")
    base = make_state(0, {"w": (256, 64), "b": (64,)})
    save_file(base, str(root / "base.safetensors"))
    for i in (1, 2):
        save_file(perturb(base, i), str(root / f"ft{i}.safetensors"))
    env = _env(root)
    for i in (1, 2):
        subprocess.run([sys.executable, "-m", "tvedit", "extract", f"ft{i}.safetensors", "-b", "base.safetensors", "-o", f"tv{i}.safetensors"], cwd=root, env=env, check=True, capture_output=True)
    for name, body in {
        "alpha_abc": "alpha: abc\ninputs: [tv1.safetensors]\n", "alpha_nan": "alpha: .nan\ninputs: [tv1.safetensors]\n",
        "weight_abc": "inputs:\n  - {path: tv1.safetensors, weight: abc}\n", "weight_inf": "inputs:\n  - {path: tv1.safetensors, weight: .inf}\n",
        "base_number": "base: 3\ninputs: [tv1.safetensors]\n",
        "mergekit_nan": "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels:\n  - {model: ft1.safetensors, parameters: {weight: .nan}}\n",
    }.items():  # fmt: skip
        (root / f"{name}.yaml").write_text(body)
    # a pickle holding an object torch's weights_only loader refuses
    (root / "evil.py").write_text("class Evil:\n    pass\n")
    subprocess.run([sys.executable, "-c", "import torch, evil; torch.save({'w': torch.zeros(2), 'x': evil.Evil()}, 'state.pt')"], cwd=root, env={**env, "PYTHONPATH": f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"}, check=True)  # fmt: skip
    (root / "evil.py").unlink()
    # a task vector whose manifest has a sparse record that is null (the example)
    raw = (root / "tv1.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    manifest = json.loads(header["__metadata__"][METADATA_KEY])
    manifest["sparse"]["w"] = None
    header["__metadata__"][METADATA_KEY] = json.dumps(manifest)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (root / "hostile.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return root


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TVEDIT_SCRATCH"] = str(root / ".scratch")
    env["TVEDIT_CACHE"] = str(root / ".cache")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if ".cache" not in p.parts}


@pytest.mark.parametrize(("command", "code"), [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_one_line_and_the_documented_code(work: Path, command: str, code: int) -> None:
    (work / ".scratch").mkdir(exist_ok=True)
    before = _listing(work)
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))) if "full.safetensors" in command else None
    proc = subprocess.run(["bash", "-c", command], cwd=work, env=_env(work), capture_output=True, timeout=300, preexec_fn=limit)
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert code in EXIT_CODES
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and err.endswith("\n"), err
    assert "Traceback" not in err and "\x1b" not in err and not BOX & set(err), err
    assert _listing(work) == before  # nothing new: no output, no temporary, no directory, no scratch file


def test_out_dir_is_created_but_not_its_parents(work: Path, tmp_path: Path) -> None:
    """--out-dir DIR creates DIR (documented); -o FILE needs its directory (the rows above)."""
    out = tmp_path / "new"
    proc = subprocess.run([sys.executable, "-m", "tvedit", "scale", "tv1.safetensors", "--by", "2", "--out-dir", str(out)], cwd=work, env=_env(work), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["tv1.scaled.safetensors"]
    assert torch.equal(open_checkpoint(out / "tv1.scaled.safetensors").get("w"), 2 * open_checkpoint(work / "tv1.safetensors").get("w"))
