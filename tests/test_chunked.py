"""Element-wise work on huge tensors goes in bounded chunks, with byte-identical results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvedit import arith, engine
from tvedit.manifest import Manifest
from tvedit.reader import content_hash, open_checkpoint
from tvedit.writer import CheckpointWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _measure import measure  # noqa: E402


def _files(tmp_path: Path, dtype: torch.dtype) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"big": torch.randn(123, 457, generator=g).to(dtype), "small": torch.randn(7, generator=g).to(dtype), "ids": torch.arange(5)}
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for j in (1, 2):
        paths[f"ft{j}"] = tmp_path / f"ft{j}.safetensors"
        save_file({k: (v.float() + 0.1 * j * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v for k, v in base.items()},
                  str(paths[f"ft{j}"]))  # fmt: skip
    return paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("method", "vectors"), [("sum", False), ("mean", False), ("sum", True)])
def test_chunked_add_is_byte_identical(tmp_path, monkeypatch, dtype, method, vectors):
    p = _files(tmp_path, dtype)
    inputs = [p["ft1"], p["ft2"]]
    if vectors:  # task-vector inputs (one of them missing a key) instead of checkpoints
        inputs = arith.extract(inputs, p["base"], arith.OutputTarget(out_dir=tmp_path / "tv"), engine.ArithOptions(layout="dense"))
        inputs = [a.path for a in inputs]
    outs = {}
    for name, mib in (("whole", "1024"), ("chunked", "0.01")):  # 0.01 MiB: 2621 entries, 22 chunks of "big"
        monkeypatch.setenv("TVEDIT_CHUNK_MIB", mib)
        opts = engine.ArithOptions(allow_missing=vectors)
        outs[name] = arith.add(inputs, tmp_path / f"{name}.safetensors", base=p["base"], alpha=0.7, weights=[1.0, 0.5], method=method, opts=opts)
    assert outs["whole"].path.read_bytes() == outs["chunked"].path.read_bytes()
    ckpt = open_checkpoint(outs["chunked"].path)
    assert content_hash(ckpt) == ckpt.manifest.sha256
    base, f1, f2 = (load_file(str(p[k])) for k in ("base", "ft1", "ft2"))
    m = load_file(str(outs["chunked"].path))
    if vectors:  # the vectors as stored (rounded to the dtype)
        tau = [w * load_file(str(f))["big"].float() for w, f in zip((1.0, 0.5), inputs, strict=True)]
    else:
        tau = [f1["big"].float() - base["big"].float(), 0.5 * (f2["big"].float() - base["big"].float())]
    merged = (tau[0] + tau[1]) / (1.5 if method == "mean" else 1.0)
    torch.testing.assert_close(m["big"].float(), (base["big"].float() + 0.7 * merged).to(dtype).float(), atol=1e-6, rtol=0)


def _sparse_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    """base + 3 fine-tunes that change ~30% of the entries, with exact ties at the TIES cut."""
    g = torch.Generator().manual_seed(1)
    base = {"big": torch.randn(123, 457, generator=g), "small": torch.randn(7, generator=g), "ids": torch.arange(5)}
    base["big"][0, :50] = 0.0
    save_file(base, str(tmp_path / "base.safetensors"))
    fts = []
    for j in (1, 2, 3):
        ft = {k: v + 0.1 * j * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3) if v.is_floating_point() else v
              for k, v in base.items()}  # fmt: skip
        ft["big"][0, :50] = 5.0  # tau = 5 exactly, 50 times, the largest |tau|: density 0.0005 (28 kept) cuts through them
        fts.append(tmp_path / f"ft{j}.safetensors")
        save_file(ft, str(fts[-1]))
    return tmp_path / "base.safetensors", fts


def _whole_and_chunked(monkeypatch, tmp_path: Path, name: str, run, chunked: bool = True) -> bytes:
    """The output's bytes with whole tensors and with chunks (asserting which path each run took)."""
    calls = []
    real = engine.write_in_chunks
    monkeypatch.setattr(engine, "write_in_chunks", lambda w, key, *a, **k: (calls.append(key), real(w, key, *a, **k)))
    outs = []
    for mib in ("1024", "0.01"):  # 0.01 MiB: 2621 entries, 22 chunks of "big"
        monkeypatch.setenv("TVEDIT_CHUNK_MIB", mib)
        calls.clear()
        outs.append(run(tmp_path / f"{name}-{mib.replace('.', '_')}.safetensors").read_bytes())
        assert calls == (["big"] if chunked and mib != "1024" else []), (name, mib, calls)
    assert outs[0] == outs[1], name
    return outs[1]


@pytest.mark.parametrize("emit", ["checkpoint", "vector"])
@pytest.mark.parametrize(("method", "options"), [
    ("ties", {}), ("ties", {"scope": "global"}), ("ties", {"density": 1.0}), ("ties", {"density": 0.0}),
    ("ties", {"density": 0.0005}), ("ties", {"density": 0.0005, "scope": "global"}),
    ("dare-ties", {}), ("dare-ties", {"rescale": "l1"}), ("consensus", {}), ("sum", {}),
])  # fmt: skip
def test_chunked_merges_are_byte_identical(tmp_path, monkeypatch, method, options, emit):
    """TIES (its cut found by a radix select over the chunks, ties at the cut by a running quota),
    DARE-TIES (each input's generator drawn on chunk after chunk; l1: exact norms summed over the
    chunks by a key pass that draws the same masks), consensus, and --emit vector
    (the writer re-encodes a sparse vector from the dense bytes it wrote): the bytes do not depend
    on the chunk size."""
    base, fts = _sparse_files(tmp_path)
    _whole_and_chunked(monkeypatch, tmp_path, f"{method}-{emit}",
                       lambda out: arith.add(fts, out, base=base, alpha=0.7, weights=[1.0, 0.5, -0.3], method=method,
                                           method_options=dict(options), emit=emit).path)  # fmt: skip


@pytest.mark.parametrize("layout", ["auto", "dense", "sparse"])
def test_chunked_extract_scale_negate_are_byte_identical(tmp_path, monkeypatch, layout):
    base, fts = _sparse_files(tmp_path)
    opts = engine.ArithOptions(layout=layout)
    data = _whole_and_chunked(monkeypatch, tmp_path, "extract", lambda out: arith.extract(fts[:1], base, out, opts)[0].path)
    tv = tmp_path / "tv.safetensors"
    tv.write_bytes(data)
    assert open_checkpoint(tv).encoding("big") == {"auto": "bitmap", "dense": "dense", "sparse": "bitmap"}[layout]  # 30% dense
    expected = load_file(str(fts[0]))["big"] - load_file(str(base))["big"]
    assert torch.equal(open_checkpoint(tv).get("big"), expected)
    dense_tv = arith.extract(fts[:1], base, tmp_path / "dense-tv.safetensors", engine.ArithOptions(layout="dense"))[0].path
    _whole_and_chunked(monkeypatch, tmp_path, "scale", lambda out: arith.scale([dense_tv], 0.3, out, opts)[0].path)
    _whole_and_chunked(monkeypatch, tmp_path, "negate", lambda out: arith.negate([dense_tv], out, opts)[0].path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 1e-5, 0.01, 0.3, 0.6, 1.0])
def test_write_chunks_stores_what_write_stores(tmp_path, monkeypatch, dtype, density):
    """Every encoding (index list, block16, bitmap, dense) comes out byte-identical whether the
    tensor is written whole or in odd-sized chunks, re-encoded in pieces of one block16 block."""
    import tvedit.writer as writer_module

    monkeypatch.setattr(writer_module, "CONVERT_NUMEL", 1)  # re-encode in pieces of 65,536 entries
    g = torch.Generator().manual_seed(2)
    n = 300_001
    t = (torch.randn(n, generator=g) * (torch.rand(n, generator=g) < density)).to(dtype)
    files = {}
    for mode in ("whole", "chunks"):
        path = tmp_path / f"{mode}.safetensors"
        with CheckpointWriter(path, Manifest(kind="task-vector"), ["a", "b", "z"], layout="auto") as w:
            w.write("a", torch.ones(100))
            if mode == "whole":
                w.write("b", t)
            else:
                w.write_chunks("b", [n], dtype, (t[i : i + 7777] for i in range(0, n, 7777)))
            w.write("z", torch.zeros(100))
            w.commit()
        files[mode] = path.read_bytes()
    assert files["whole"] == files["chunks"]
    ckpt = open_checkpoint(tmp_path / "chunks.safetensors")
    assert torch.equal(ckpt.get("b"), t)
    assert content_hash(ckpt) == ckpt.manifest.sha256
    expected = {0.0: "indices", 1e-5: "indices", 0.01: "block16", 0.3: "bitmap", 0.6: "dense", 1.0: "dense"}[density]
    assert ckpt.encoding("b") == expected


def test_write_chunks_checks_the_byte_count(tmp_path):
    with CheckpointWriter(tmp_path / "x.safetensors", Manifest(kind="checkpoint"), ["a"]) as w:
        with pytest.raises(ValueError, match="the shape needs"):
            w.write_chunks("a", [10], torch.float32, [torch.zeros(4), torch.zeros(4)])
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_peak_rss_is_set_by_the_chunk_not_the_tensor(tmp_path):
    """One 64 MiB tensor per file, 2 inputs + base: whole-tensor buffers would need (N+2+2) x 64 MiB."""
    numel = 16 * 1024 * 1024
    save_file({"w": torch.zeros(numel)}, str(tmp_path / "base.safetensors"))
    for j in (1, 2):
        save_file({"w": torch.full((numel,), float(j))}, str(tmp_path / f"ft{j}.safetensors"))
    rss = {}
    for name, mib in (("whole", "1024"), ("chunked", "4")):
        cmd = [sys.executable, "-m", "tvedit", "add", str(tmp_path / "ft1.safetensors"), str(tmp_path / "ft2.safetensors"),
               "--base", str(tmp_path / "base.safetensors"), "-o", str(tmp_path / f"{name}.safetensors")]  # fmt: skip
        rss[name] = measure(cmd, dict(os.environ, TVEDIT_CHUNK_MIB=mib))["peak_rss_mib"]
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "chunked.safetensors").read_bytes()
    rss["runtime"] = measure([sys.executable, "-c", "import torch, tvedit.arith"])["peak_rss_mib"]
    assert rss["chunked"] - rss["runtime"] < 64, rss  # less than one tensor above the torch runtime
    assert rss["whole"] - rss["chunked"] > 96, rss  # whole-tensor buffers: several 64 MiB tensors


@pytest.mark.parametrize("method", ["sum", "ties"])
def test_first_use_of_chunked_inputs_records_their_content_hash(tmp_path, monkeypatch, method):
    """Plain inputs read a chunk at a time (and one chunk ahead on the reader thread) get the same
    content hash as a separate pass; TIES reads the huge key three times, restarting from 0."""
    base, fts = _sparse_files(tmp_path)
    monkeypatch.setenv("TVEDIT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TVEDIT_CHUNK_MIB", "0.01")
    art = arith.add(fts, tmp_path / "out.safetensors", base=base, method=method)
    recorded = {Path(r["path"]).name: r["sha256"] for r in art.manifest.provenance[-1]["inputs"]}
    for p in [*fts, base]:
        assert recorded[p.name] == content_hash(open_checkpoint(p)), p.name


def test_each_input_is_read_and_hashed_on_its_own_reader_thread(tmp_path, monkeypatch):
    """First use: after the first range of a huge key, every range of every input (θ0 included)
    is read, and hashed, on a reader thread, and the inputs' reads overlap on distinct threads."""
    import threading
    import time

    from tvedit.reader import Checkpoint

    base, fts = _sparse_files(tmp_path)
    monkeypatch.setenv("TVEDIT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TVEDIT_CHUNK_MIB", "0.01")
    seen: list[tuple[str, str, int]] = []
    real = Checkpoint.get_range

    def spy(self, key, start, out):
        seen.append((self.path.name, threading.current_thread().name, start))
        time.sleep(0.001)  # long enough for the other inputs' reads ahead to be in flight
        return real(self, key, start, out)

    monkeypatch.setattr(Checkpoint, "get_range", spy)
    art = arith.add(fts, tmp_path / "out.safetensors", base=base)
    main = threading.main_thread().name
    assert {start for _, thread, start in seen if thread == main} == {0}  # only the first range of "big"
    readers = {thread for _, thread, _ in seen if thread != main}
    assert all(t.startswith("tvedit-read") for t in readers) and len(readers) >= 2, readers
    assert {name for name, _, _ in seen} == {p.name for p in [*fts, base]}
    recorded = {Path(r["path"]).name: r["sha256"] for r in art.manifest.provenance[-1]["inputs"]}
    for p in [*fts, base]:
        assert recorded[p.name] == content_hash(open_checkpoint(p)), p.name


@pytest.mark.parametrize("layout", ["auto", "dense"])
def test_chunked_mask_apply_is_byte_identical(tmp_path, monkeypatch, layout):
    """mask apply reads the bit-packed mask a byte range at a time (chunks start at multiples of 8)."""
    from tvedit.masking import mask

    base, fts = _sparse_files(tmp_path)
    tv = arith.extract(fts[:1], base, tmp_path / "tv.safetensors", engine.ArithOptions(layout="dense"))[0].path
    saved = mask("topk", [tv], tmp_path / "topk.safetensors", options={"density": 0.3}, save_mask=tmp_path / "m.safetensors").masks[0].path
    data = _whole_and_chunked(monkeypatch, tmp_path, "apply",
                              lambda out: mask("apply", [tv], out, mask_file=saved, opts=engine.ArithOptions(layout=layout)).outputs[0].path)  # fmt: skip
    (tmp_path / "applied.safetensors").write_bytes(data)
    keep = open_checkpoint(saved).get("big")
    expected = torch.where(keep, open_checkpoint(tv).get("big"), torch.zeros(()))
    assert torch.equal(open_checkpoint(tmp_path / "applied.safetensors").get("big"), expected)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan"])
def test_a_bad_chunk_size_is_a_usage_error_before_any_output(tmp_path, value):
    base, fts = _sparse_files(tmp_path)
    env = dict(os.environ, TVEDIT_CHUNK_MIB=value)
    proc = subprocess.run([sys.executable, "-m", "tvedit", "add", *map(str, fts), "--base", str(base), "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: TVEDIT_CHUNK_MIB={value!r}: must be a positive number of MiB"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o.", "o."))]


def _mask_runs(monkeypatch, tmp_path: Path, name: str, run) -> list[bytes]:
    """Every file ``run(out_dir)`` writes, whole and in chunks of 2616 and of 128 entries (rows of
    457 longer than a chunk, chunks straddling rows), asserting which path each run took."""
    calls = []
    real = engine.write_in_chunks
    monkeypatch.setattr(engine, "write_in_chunks", lambda w, key, *a, **k: (calls.append(key), real(w, key, *a, **k)))
    runs = []
    for mib in ("1024", "0.01", "0.0005"):
        monkeypatch.setenv("TVEDIT_CHUNK_MIB", mib)
        calls.clear()
        paths = run(tmp_path / f"{name}-{mib.replace('.', '_')}")
        assert calls == ([] if mib == "1024" else ["big"]), (name, mib, calls)
        runs.append([p.read_bytes() for p in paths])
    assert runs[0] == runs[1] == runs[2], name
    return runs[0]


@pytest.mark.parametrize(("method", "options"), [
    ("topk", {"density": 0.3}), ("topk", {"density": 0.0005}), ("topk", {"density": 0.0005, "scope": "global"}),
    ("dare", {"density": 0.3}), ("dare", {"density": 0.3, "rescale": "l1", "seed": 4}),
    ("breadcrumbs", {"density": 0.3, "beta": 0.05}), ("breadcrumbs", {"density": 0.0005, "beta": 0.0005, "scope": "tensor"}),
    ("breadcrumbs", {"density": 0.2, "beta": 0.0}), ("tall", {}), ("consensus", {"lambda": 0.4}),
])  # fmt: skip
def test_chunked_mask_methods_are_byte_identical(tmp_path, monkeypatch, method, options):
    """Every mask method writes the same outputs and saved masks (bit-packed a chunk at a time)
    whole and in chunks: top-k and Breadcrumbs cuts by an exact radix select (through the 50 tied
    entries tau = 5 of row 0), DARE's generators drawn chunk after chunk (l1: exact norms summed
    over the chunks), TALL and consensus element-wise; and the mask algebra over those masks."""
    from tvedit.masking import mask

    base, fts = _sparse_files(tmp_path)
    tvs = [a.path for a in arith.extract(fts, base, arith.OutputTarget(out_dir=tmp_path / "tv"), engine.ArithOptions(layout="dense"))]
    inputs = tvs if method in ("tall", "consensus") else tvs[:1]

    def run(where: Path) -> list[Path]:
        where.mkdir()
        target = arith.OutputTarget(out_dir=where / "out")
        saved = where / ("m.safetensors" if method == "consensus" or len(inputs) == 1 else "masks")
        res = mask(method, inputs, target, options=dict(options), save_mask=saved)
        return [a.path for a in res.outputs + res.masks]

    files = _mask_runs(monkeypatch, tmp_path, method, run)
    # the outputs are what the masks say, and the masks what the whole-tensor reference gives
    out = tmp_path / "check.safetensors"
    out.write_bytes(files[0])
    keep_file = tmp_path / "keep.safetensors"
    keep_file.write_bytes(files[len(inputs) if method != "consensus" else len(inputs)])
    keep = open_checkpoint(keep_file).get("big")
    tau = open_checkpoint(inputs[0]).get("big")
    if method == "dare":
        assert torch.equal(open_checkpoint(out).get("big") != 0, keep & (tau != 0))
    else:
        assert torch.equal(open_checkpoint(out).get("big"), torch.where(keep, tau, torch.zeros(())))
    if method == "topk" and "scope" not in options:
        from tvedit.ops import sparsify

        assert torch.equal(keep, sparsify.topk_mask(tau, options["density"]))
    if method == "breadcrumbs":
        from tvedit.ops import sparsify

        assert torch.equal(keep, sparsify.breadcrumbs_mask(tau, options["density"], options["beta"], per_row=options.get("scope") != "tensor"))


@pytest.mark.parametrize("method", ["invert", "intersect", "union"])
def test_chunked_mask_algebra_is_byte_identical(tmp_path, monkeypatch, method):
    from tvedit.masking import mask

    base, fts = _sparse_files(tmp_path)
    tvs = [a.path for a in arith.extract(fts[:2], base, arith.OutputTarget(out_dir=tmp_path / "tv"), engine.ArithOptions(layout="dense"))]
    masks = [mask("topk", [tv], tmp_path / f"t{i}.safetensors", options={"density": d}, save_mask=tmp_path / f"m{i}.safetensors").masks[0].path
             for i, (tv, d) in enumerate(zip(tvs, (0.3, 0.6), strict=True))]  # fmt: skip
    inputs = masks[:1] if method == "invert" else masks
    files = _mask_runs(monkeypatch, tmp_path, method, lambda where: [a.path for a in mask(method, inputs, arith.OutputTarget(out_dir=where)).outputs])
    got = tmp_path / "got.safetensors"
    got.write_bytes(files[0])
    a, b = (open_checkpoint(p).get("big") for p in masks)
    expected = {"invert": ~a, "intersect": a & b, "union": a | b}[method]
    assert torch.equal(open_checkpoint(got).get("big"), expected)
