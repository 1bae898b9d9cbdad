"""`--device` for the tensor commands (issue 17, item 6): the engine stages every tensor the
math sees on the chosen device and brings results back to the host for writing.

There is no GPU on the machines these tests must pass on, so the plumbing is checked with
``--device cpu``: an explicit device makes the engine stage through separate device buffers (the
code path a GPU takes), so a tensor that skips staging, a buffer reused too early or a result not
brought back shows here as a changed byte. Every method of every table runs staged and unstaged,
whole and in chunks, and the tensors must be identical (the same operations in the same order on
the same device: exact). A static check keeps every allocation in the math and engine modules on
an explicit device, so a CPU-only tensor cannot meet a CUDA one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tvedit import arith, engine
from tvedit.masking import MASK_METHODS, mask
from tvedit.mergekit import METHODS as MERGEKIT_METHODS
from tvedit.merging import METHODS
from tvedit.reader import open_checkpoint

from .tiny_hf import run_cli

SRC = Path(__file__).resolve().parents[1] / "src" / "tvedit"


@pytest.fixture
def staged(monkeypatch) -> list[str]:
    """Records each time a tensor is staged on an explicit device (Slot buffers and on_device)."""
    seen: list[str] = []
    real_dev, real_on = engine.Slot._dev, engine.on_device

    def dev(self, shape):
        if self.device is not None:
            seen.append("slot")
        return real_dev(self, shape)

    def on_device(t, opts):
        if opts.device is not None:
            seen.append("on_device")
        return real_on(t, opts)

    monkeypatch.setattr(engine.Slot, "_dev", dev)
    monkeypatch.setattr(engine, "on_device", on_device)
    return seen


def _files(tmp_path: Path) -> tuple[Path, list[Path]]:
    """base + 3 fine-tunes changing ~30% of the entries; 'big' has exact ties at the top."""
    g = torch.Generator().manual_seed(3)
    base = {"big": torch.randn(61, 97, generator=g), "small": torch.randn(7, generator=g), "ids": torch.arange(5)}
    save_file(base, str(tmp_path / "base.safetensors"))
    fts = []
    for j in (1, 2, 3):
        ft = {k: v + 0.1 * j * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3) if v.is_floating_point() else v
              for k, v in base.items()}  # fmt: skip
        ft["big"][0, :20] = 5.0
        fts.append(tmp_path / f"ft{j}.safetensors")
        save_file(ft, str(fts[-1]))
    return tmp_path / "base.safetensors", fts


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def _both(monkeypatch, staged: list[str], run, tmp_path: Path, name: str) -> None:
    """``run(out, opts)`` -> written paths, unstaged and staged on cpu, whole and in chunks of 512 entries."""
    for mib in ("1024", "0.002"):
        monkeypatch.setenv("TVEDIT_CHUNK_MIB", mib)
        outs = []
        for device in (None, torch.device("cpu")):
            staged.clear()
            where = tmp_path / f"{name}-{mib}-{device}"
            where.mkdir()
            outs.append(run(where, engine.ArithOptions(device=device)))
            assert bool(staged) == (device is not None), (name, mib, device)
        assert len(outs[0]) == len(outs[1]) > 0
        for a, b in zip(*outs, strict=True):
            _same_tensors(a, b)
        manifest = open_checkpoint(outs[1][0]).manifest
        assert manifest is not None and "device" in manifest.to_dict()["provenance"][-1]["params"], name


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("emit", ["checkpoint", "vector"])
def test_every_merge_method_is_the_same_staged(tmp_path, monkeypatch, staged, method, emit):
    base, fts = _files(tmp_path)
    options = {"density": 0.3} if method in ("ties", "dare-ties") else {}
    if method == "dare-ties":
        options["rescale"] = "l1"

    def run(where: Path, opts: engine.ArithOptions) -> list[Path]:
        art = arith.add(fts, where / "out.safetensors", base=base, alpha=0.7, weights=[1.0, 0.5, -0.3], method=method,
                        method_options=dict(options), emit=emit, opts=opts)  # fmt: skip
        return [art.path]

    _both(monkeypatch, staged, run, tmp_path, f"{method}-{emit}")


@pytest.mark.parametrize("op", ["extract", "scale", "negate", "compress"])
def test_extract_scale_negate_compress_are_the_same_staged(tmp_path, monkeypatch, staged, op):
    from tvedit.compress import compress

    base, fts = _files(tmp_path)
    tv = arith.extract(fts[:1], base, tmp_path / "tv.safetensors", engine.ArithOptions(layout="dense"))[0].path

    def run(where: Path, opts: engine.ArithOptions) -> list[Path]:
        out = where / "out.safetensors"
        if op == "extract":
            return [a.path for a in arith.extract(fts[:1], base, out, opts)]
        if op == "scale":
            return [a.path for a in arith.scale([tv], 0.3, out, opts)]
        if op == "negate":
            return [a.path for a in arith.negate([tv], out, opts)]
        return [a.path for a in compress([tv], out, rank=5, opts=opts)]

    _both(monkeypatch, staged, run, tmp_path, op)


MASK_OPTIONS = {
    "topk": [{"density": 0.3}, {"density": 0.01, "scope": "global"}],
    "dare": [{"density": 0.3}, {"density": 0.3, "rescale": "l1"}],
    "breadcrumbs": [{"density": 0.3, "beta": 0.05}],
    "tall": [{}],
    "consensus": [{}],
    "apply": [{}],
    "invert": [{}],
    "intersect": [{}],
    "union": [{}],
}


@pytest.mark.parametrize(("method", "options"), [(m, o) for m in MASK_METHODS for o in MASK_OPTIONS[m]])
def test_every_mask_method_is_the_same_staged(tmp_path, monkeypatch, staged, method, options):
    base, fts = _files(tmp_path)
    tvs = [a.path for a in arith.extract(fts, base, arith.OutputTarget(out_dir=tmp_path / "tv"), engine.ArithOptions(layout="dense"))]
    masks = [mask("topk", [tv], tmp_path / f"t{i}.safetensors", options={"density": d}, save_mask=tmp_path / f"m{i}.safetensors").masks[0].path
             for i, (tv, d) in enumerate(zip(tvs[:2], (0.3, 0.6), strict=True))]  # fmt: skip
    takes_masks = MASK_METHODS[method].takes == "mask"
    inputs = (masks[:1] if method == "invert" else masks) if takes_masks else (tvs if method in ("tall", "consensus") else tvs[:1])

    def run(where: Path, opts: engine.ArithOptions) -> list[Path]:
        saved = None if takes_masks or method == "apply" else where / ("m.safetensors" if method == "consensus" or len(inputs) == 1 else "masks")
        res = mask(method, inputs, arith.OutputTarget(out_dir=where / "out"), options=dict(options), save_mask=saved, opts=opts,
                   mask_file=masks[0] if method == "apply" else None)  # fmt: skip
        return [a.path for a in res.outputs + res.masks]

    _both(monkeypatch, staged, run, tmp_path, method)


@pytest.mark.parametrize("method", sorted(MERGEKIT_METHODS))
def test_every_mergekit_method_is_the_same_with_device_cpu(tmp_path, method):
    """Through the CLI: a recipe with and without ``--device cpu`` gives the same tensors."""
    base, fts = _files(tmp_path)
    params = {"weight": 0.7, "density": 0.5}
    models = [{"model": str(f), "parameters": params} for f in fts]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base), "models": models}))
    outs = []
    for extra in ([], ["--device", "cpu"]):
        out = tmp_path / f"out{len(outs)}.safetensors"
        code, _, err = run_cli("add", recipe, "-o", out, *extra)
        assert code == 0, err
        outs.append(out)
    _same_tensors(*outs)
    assert open_checkpoint(outs[1]).manifest.to_dict()["provenance"][-1]["params"]["device"] == "cpu"


def test_device_option_errors_are_usage_errors(tmp_path):
    base, fts = _files(tmp_path)
    for cmd in (["add", str(fts[0]), "--base", str(base)], ["extract", str(fts[0]), "--base", str(base)]):
        code, _, err = run_cli(*cmd, "-o", tmp_path / "x.safetensors", "--device", "nope")
        assert code == 2 and "--device 'nope'" in err, err
        if not torch.cuda.is_available():
            code, _, err = run_cli(*cmd, "-o", tmp_path / "x.safetensors", "--device", "cuda")
            assert code == 2 and "CUDA is not available" in err, err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["sum", "ties", "dare-ties", "tsv"])
def test_cuda_matches_the_host(tmp_path, method):
    """On a machine with a GPU: the merge on CUDA equals the host's to float32 rounding of one
    merge (element-wise methods: identical up to the reduction order of TIES's sums)."""
    base, fts = _files(tmp_path)
    options = {"density": 0.3} if method in ("ties", "dare-ties") else {}
    host = arith.add(fts, tmp_path / "h.safetensors", base=base, method=method, method_options=dict(options), opts=engine.ArithOptions())
    cuda = arith.add(fts, tmp_path / "c.safetensors", base=base, method=method, method_options=dict(options),
                     opts=engine.ArithOptions(device=torch.device("cuda")))  # fmt: skip
    a, b = load_file(str(host.path)), load_file(str(cuda.path))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# every allocation in the math and the engine names its device
# --------------------------------------------------------------------------------------------
FACTORIES = {"empty", "zeros", "ones", "full", "arange", "tensor", "rand", "randn", "randint", "eye", "linspace"}
DEVICE_MODULES = [*sorted((SRC / "ops").glob("*.py")), *(SRC / f for f in ("engine.py", "arith.py", "merging.py", "masking.py", "mergekit.py", "compress.py"))]


def undeviced_allocations(source: str) -> list[int]:
    """Lines of ``torch.<factory>(...)`` calls without a ``device=`` argument, and of engine
    ``Slot(...)`` buffers made without the command's device (its second argument)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        factory = isinstance(f, ast.Attribute) and f.attr in FACTORIES and isinstance(f.value, ast.Name) and f.value.id == "torch"
        if factory and not any(k.arg == "device" for k in node.keywords):
            lines.append(node.lineno)
        slot = (isinstance(f, ast.Name) and f.id == "Slot") or (isinstance(f, ast.Attribute) and f.attr == "Slot")
        if slot and len(node.args) < 2 and not any(k.arg == "device" for k in node.keywords):
            lines.append(node.lineno)
    return lines


def test_the_static_check_finds_an_allocation_without_a_device():
    src = "import torch\nx = torch.zeros(3, dtype=torch.bool)\ny = torch.zeros(3, device=x.device)\na = Slot(d)\nb = engine.Slot(d, opts.device)\n"
    assert undeviced_allocations(src) == [2, 4]


@pytest.mark.parametrize("path", DEVICE_MODULES, ids=lambda p: p.name)
def test_every_allocation_names_its_device(path):
    bad = undeviced_allocations(path.read_text())
    assert not bad, f"{path.name}: torch factory calls without device= at lines {bad} (they would stay on the CPU under --device cuda)"
