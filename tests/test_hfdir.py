"""Hugging Face directories in and out: tiny random Llama (causal LM) and T5 (seq2seq) models, three
fine-tunes + base -> one `tvedit add` -> from_pretrained offline, weights = theta0 + alpha * sum tau."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tvedit.reader import content_hash, open_checkpoint

from .tiny_hf import directory_weights, finetuned_copy, offline, run_cli, write_tiny_llama  # noqa: F401 (offline: a fixture)
from .tiny_t5 import write_tiny_t5

ALPHA = 0.5


pytestmark = pytest.mark.usefixtures("offline")  # every test here: offline, one torch thread


def _expected(base: Path, fts: list[Path], alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """theta0 + alpha * sum_i (theta_i - theta0), in float32, cast to the stored dtype."""
    b = directory_weights(base)
    f = [directory_weights(p) for p in fts]
    out = {}
    for k, v in b.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        acc = f[0][k].float() - v.float()
        for x in f[1:]:
            acc = acc + (x[k].float() - v.float())
        out[k] = (acc * alpha + v.float()).to(v.dtype)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = write_tiny_llama(root / "base")
    dirs = {"root": root, "base": base}
    for i in range(3):
        dirs[f"ft{i}"] = finetuned_copy(base, root / f"ft{i}", seed=i + 1)
    return dirs


def _fts(d: dict[str, Path]) -> list[Path]:
    return [d[f"ft{i}"] for i in range(3)]


def test_llama_add_writes_a_directory_from_pretrained_loads(llama: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code, stdout, stderr = run_cli("add", *_fts(llama), "--base", llama["base"], "--alpha", ALPHA, "-o", f"{out}/", "--json")
    assert code == 0, stderr
    record = json.loads(stdout.strip().splitlines()[-1])
    assert record["path"] == str(out) and record["kind"] == "checkpoint"
    # config, generation config and tokenizer: byte for byte from the base directory
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (llama["base"] / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok("w1 w2 w3")["input_ids"][-3:] == [5, 6, 7]
    expected = _expected(llama["base"], _fts(llama))
    state = model.state_dict()
    for k, v in expected.items():
        assert state[k].dtype == torch.bfloat16  # dtype preserved
        assert torch.equal(state[k], v), k
    with torch.no_grad():
        model(torch.tensor([[1, 5, 6]]))
    # manifest: in the header, family hf with the architecture; README lists the inputs' hashes
    ckpt = open_checkpoint(out)
    assert ckpt.manifest is not None and ckpt.manifest.model["family"] == "hf"
    assert ckpt.manifest.model["architectures"] == ["LlamaForCausalLM"] and ckpt.manifest.model["model_type"] == "llama"
    assert ckpt.manifest.sha256 == content_hash(ckpt)
    card = (out / "README.md").read_text()
    for rec in ckpt.manifest.provenance[-1]["inputs"]:
        assert rec["sha256"] in card
    assert "alpha: `0.5`" in card and "LlamaForCausalLM" in card
    # an existing non-empty directory needs --force; with it, it is replaced, and nothing is left beside it
    code, _, stderr = run_cli("add", *_fts(llama), "--base", llama["base"], "-o", out)
    assert code == 6 and "--force" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = run_cli("add", *_fts(llama), "--base", llama["base"], "-o", out, "--force", "--alpha", "0.25")
    assert code == 0, stderr
    assert torch.equal(directory_weights(out)["lm_head.weight"], _expected(llama["base"], _fts(llama), 0.25)["lm_head.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_sharded_output_loads_and_matches_one_file(llama: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    one, many = tmp_path / "one", tmp_path / "many"
    assert run_cli("add", *_fts(llama), "--base", llama["base"], "-o", f"{one}/")[0] == 0
    code, _, stderr = run_cli("add", *_fts(llama), "--base", llama["base"], "--format", "hf", "-o", many, "--max-shard-size", "5KB")
    assert code == 0, stderr
    shards = sorted(many.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (many / "model.safetensors").exists()
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(directory_weights(one))
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in directory_weights(one).values())
    sizes = {s.name: 0 for s in shards}
    for key, name in index["weight_map"].items():
        t = directory_weights(one)[key]
        sizes[name] += t.numel() * t.element_size()
    assert all(n <= 5000 or len([k for k, v in index["weight_map"].items() if v == name]) == 1 for name, n in sizes.items())
    manifests = set()
    for s in shards:  # the same manifest in every shard's header
        with safe_open(str(s), "pt") as f:
            manifests.add(f.metadata()["tvedit"])
    assert len(manifests) == 1
    ckpt = open_checkpoint(many)
    assert ckpt.sha256 == content_hash(ckpt) == open_checkpoint(one).sha256
    a = AutoModelForCausalLM.from_pretrained(str(one), local_files_only=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(many), local_files_only=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a sharded directory is an input too: the sum of one vector is itself
    code, _, stderr = run_cli("extract", many, "--base", llama["base"], "-o", tmp_path / "tv.safetensors")
    assert code == 0, stderr
    tv = load_file(str(tmp_path / "tv.safetensors"))
    base = directory_weights(llama["base"])
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(tv[k], (directory_weights(many)[k].float() - base[k].float()).to(torch.bfloat16))


def test_tied_embeddings_are_left_out_as_save_pretrained_does(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = write_tiny_llama(tmp_path / "base", tie_word_embeddings=True)
    assert "lm_head.weight" not in directory_weights(base)  # save_pretrained leaves the tied head out
    fts = [finetuned_copy(base, tmp_path / f"ft{i}", seed=i + 1) for i in range(3)]
    code, _, stderr = run_cli("add", *fts, "--base", base, "-o", f"{tmp_path / 'out'}/", "--alpha", ALPHA)
    assert code == 0, stderr
    assert "lm_head.weight" not in directory_weights(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    expected = _expected(base, fts)["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, expected) and torch.equal(model.model.embed_tokens.weight, expected)


def test_tied_alias_stored_in_the_base_is_dropped(tmp_path: Path) -> None:
    """A base that stores the tied head too (older savers): the alias is left out, as save_pretrained does."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = write_tiny_llama(tmp_path / "base", tie_word_embeddings=True)
    state = load_file(str(base / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    fts = [finetuned_copy(base, tmp_path / f"ft{i}", seed=i + 1) for i in range(2)]
    for ft in fts:  # a fine-tune of tied weights keeps them equal
        s = load_file(str(ft / "model.safetensors"))
        s["lm_head.weight"] = s["model.embed_tokens.weight"].clone()
        save_file(s, str(ft / "model.safetensors"), metadata={"format": "pt"})
    assert run_cli("add", *fts, "--base", base, "-o", f"{tmp_path / 'out'}/", "--method", "dare-ties")[0] == 0
    assert "lm_head.weight" not in directory_weights(tmp_path / "out")
    assert "tied" in (tmp_path / "out" / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert torch.equal(model.lm_head.weight, directory_weights(tmp_path / "out")["model.embed_tokens.weight"])


def test_t5_add_writes_a_seq2seq_directory(tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    base = write_tiny_t5(tmp_path / "base")
    fts = [finetuned_copy(base, tmp_path / f"ft{i}", seed=i + 1) for i in range(3)]
    code, _, stderr = run_cli("add", *fts, "--base", base, "--alpha", ALPHA, "-o", f"{tmp_path / 'out'}/")
    assert code == 0, stderr
    out = tmp_path / "out"
    model = AutoModelForSeq2SeqLM.from_pretrained(str(out), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    expected = _expected(base, fts)
    state = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    enc = tok(["hello"], return_tensors="pt")
    with torch.no_grad():
        model(**enc, decoder_input_ids=torch.zeros((1, 1), dtype=torch.long))
    manifest = open_checkpoint(out).manifest
    assert manifest is not None and manifest.model["architectures"] == ["T5ForConditionalGeneration"]


def test_configs_that_disagree_are_one_line_errors(llama: dict[str, Path], tmp_path: Path) -> None:
    other = write_tiny_llama(tmp_path / "wide", hidden_size=32)
    code, _, stderr = run_cli("add", llama["ft0"], other, "--base", llama["base"], "-o", f"{tmp_path / 'out'}/")
    assert code == 4
    line = stderr.strip()
    assert len(line.splitlines()) == 1
    assert f"{other / 'config.json'}" in line and f"{llama['base'] / 'config.json'}" in line and "'hidden_size'" in line
    assert not (tmp_path / "out").exists()


def test_differing_tokenizer_is_a_warning_naming_the_file(llama: dict[str, Path], tmp_path: Path) -> None:
    ft = finetuned_copy(llama["base"], tmp_path / "ft", seed=9)
    tok = json.loads((ft / "tokenizer.json").read_text())
    tok["model"]["vocab"]["w59"], tok["model"]["vocab"]["w58"] = tok["model"]["vocab"]["w58"], tok["model"]["vocab"]["w59"]
    (ft / "tokenizer.json").write_text(json.dumps(tok))
    code, _, stderr = run_cli("add", ft, llama["ft0"], "--base", llama["base"], "-o", tmp_path / "m.safetensors")
    assert code == 0, stderr
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and str(ft / "tokenizer.json") in warnings[0]


def test_export_hf_any_architecture(llama: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run_cli("add", *_fts(llama), "--base", llama["base"], "-o", tmp_path / "m.safetensors")[0] == 0
    for args in ([], ["--like", str(llama["base"])]):  # the recorded source directory, or --like
        out = tmp_path / f"hf{len(args)}"
        code, _, stderr = run_cli("export-hf", tmp_path / "m.safetensors", "-o", out, *args)
        assert code == 0, stderr
        assert (out / "tokenizer.json").read_bytes() == (llama["base"] / "tokenizer.json").read_bytes()
        model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
        AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        assert torch.equal(model.state_dict()["lm_head.weight"], load_file(str(tmp_path / "m.safetensors"))["lm_head.weight"])
    # a source without a tokenizer: what exists is copied, the rest is named
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((llama["base"] / "config.json").read_bytes())
    code, _, stderr = run_cli("export-hf", tmp_path / "m.safetensors", "-o", tmp_path / "hf-bare", "--like", bare, "--dtype", "float32")
    assert code == 0, stderr
    assert "generation_config.json" in stderr and "tokenizer" in stderr
    assert "config.json says bfloat16" in stderr  # the copied config is not rewritten
    assert directory_weights(tmp_path / "hf-bare")["lm_head.weight"].dtype == torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-bare"), local_files_only=True, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, load_file(str(tmp_path / "m.safetensors"))["lm_head.weight"].float())
    # --like of another architecture: one-line mismatch
    t5 = write_tiny_t5(tmp_path / "t5")
    code, _, stderr = run_cli("export-hf", tmp_path / "m.safetensors", "-o", tmp_path / "hf-t5", "--like", t5)
    assert code == 4 and len(stderr.strip().splitlines()) == 1 and not (tmp_path / "hf-t5").exists()


@pytest.mark.parametrize("emit", ["checkpoint", "vector"])
def test_sharded_directory_outputs_do_not_depend_on_the_chunk_size(llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emit: str) -> None:
    """Huge tensors go in chunks into a sharded directory too (checkpoints, and task vectors that the
    shard's writer may re-encode sparse): every file is byte-identical to the whole-tensor run."""
    from tvedit import engine

    calls: list[str] = []
    real = engine.write_in_chunks
    monkeypatch.setattr(engine, "write_in_chunks", lambda w, key, *a, **k: (calls.append(key), real(w, key, *a, **k)))
    outs = []
    for mib in ("1024", "0.0005"):  # 0.0005 MiB: chunks of 131 entries
        monkeypatch.setenv("TVEDIT_CHUNK_MIB", mib)
        out = tmp_path / mib / "out"  # the model card names the directory
        out.parent.mkdir()  # an output directory is created, its parent must exist
        code, _, stderr = run_cli("add", *_fts(llama), "--base", llama["base"], "--emit", emit, "--format", "hf", "-o", out,
                              "--max-shard-size", "20KB", "--alpha", "0.4")  # fmt: skip
        assert code == 0, stderr
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert len(calls) > 5, calls  # the second run chunked the larger matrices
    assert outs[0] == outs[1]
