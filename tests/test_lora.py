"""LoRA adapters in and out, with real PEFT: `tvedit import ADAPTER_DIR` gives exactly W + scale·B·A
(the tolerance derived from float32 rounding of the stored factors), `tvedit export-lora` at full rank
is loaded by PeftModel.from_pretrained offline and merges to θ0 + τ, imported adapters merge with TIES
like any other vectors, and bad adapters fail with one line and their exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvedit.reader import load_tensors, open_checkpoint

from .tiny_hf import directory_weights, finetuned_copy, offline, run_cli, write_tiny_llama  # noqa: F401 (offline: a fixture)

peft = pytest.importorskip("peft")

EPS32 = torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("offline")  # every test here: offline, one torch thread


def _gpt2(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=1, eos_token_id=2)).save_pretrained(str(path))
    return path


def _adapter(base: Path, out: Path, seed: int, **config: object) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(str(out))
    return out


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def _factor_tolerance(delta: torch.Tensor, reference: torch.Tensor) -> float:
    """The float32 error of W + U diag(S) V^T from factors rounded to float32 and multiplied in
    float32 (k terms): each term's entries are at most S_i (|U|, |V| <= 1), so the error is at most
    about (k + 3) eps32 sum_i S_i, plus the final rounding of the sum (eps32 |W + ΔW|)."""
    s = torch.linalg.svdvals(delta.double())
    k = int((s > 0).sum())
    return float(4 * (k + 3) * EPS32 * s.sum() + EPS32 * reference.abs().max())


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "base", dtype="float32")


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------
def test_import_then_add_gives_w_plus_scaled_ba(llama: Path, tmp_path: Path) -> None:
    adapter = _adapter(llama, tmp_path / "ad", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    code, out, err = run_cli("import", adapter, "-o", tmp_path / "tau.safetensors", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["kind"] == "task-vector" and record["manifest"]["base"]["path"] == str(llama)  # from adapter_config.json
    tau = open_checkpoint(tmp_path / "tau.safetensors")
    assert tau.encoding("model.layers.0.self_attn.q_proj.weight") == "lowrank"
    assert tau.encoding("model.layers.0.mlp.up_proj.weight") != "lowrank" and not tau.get("model.layers.0.mlp.up_proj.weight").any()
    code, _, err = run_cli("add", tmp_path / "tau.safetensors", "-o", tmp_path / "merged.safetensors")
    assert code == 0, err
    merged, _ = load_tensors(tmp_path / "merged.safetensors")
    base = directory_weights(llama)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    scale = 8 / 4
    checked = 0
    for key, w in base.items():
        module = key.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key not in lora:
            assert torch.equal(merged[key], w), key  # untouched: exactly θ0
            continue
        delta = scale * lora[f"base_model.model.{module}.lora_B.weight"].double() @ lora[a_key].double()
        ref = w.double() + delta
        tol = _factor_tolerance(delta, ref)
        assert (merged[key].double() - ref).abs().max() <= tol, key
        checked += 1
    assert checked == 4
    peft_merged = _peft_merged(llama, adapter)  # the same weights PEFT's own merge gives
    for key in merged:
        assert torch.allclose(merged[key], peft_merged[key], rtol=0, atol=1e-5), key


def test_import_rslora_patterns_embedding_and_modules_to_save(llama: Path, tmp_path: Path) -> None:
    """rsLoRA scale alpha/sqrt(r), per-module rank_pattern/alpha_pattern, an Embedding LoRA (ΔW
    transposed) and a modules_to_save entry (a dense difference): the result equals PEFT's merge."""
    adapter = _adapter(
        llama, tmp_path / "ad", 2, r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"o_proj": 3},
        target_modules=["q_proj", "o_proj", "embed_tokens"], modules_to_save=["lm_head"],
    )  # fmt: skip
    # a trained modules_to_save copy differs from the base
    state = load_file(str(adapter / "adapter_model.safetensors"))
    state["base_model.model.lm_head.weight"] = state["base_model.model.lm_head.weight"] + 0.25
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli("import", adapter, "--base", llama, "-o", tmp_path / "tau.safetensors")
    assert code == 0, err
    tau = open_checkpoint(tmp_path / "tau.safetensors")
    assert tau.manifest.sparse["model.layers.0.self_attn.q_proj.weight"]["rank"] == 2
    assert tau.encoding("model.embed_tokens.weight") == "lowrank"
    assert torch.allclose(tau.get("lm_head.weight"), torch.full((64, 16), 0.25), atol=1e-6)
    code, _, err = run_cli("add", tmp_path / "tau.safetensors", "-o", tmp_path / "merged.safetensors")
    assert code == 0, err
    merged, _ = load_tensors(tmp_path / "merged.safetensors")
    peft_merged = _peft_merged(llama, adapter)
    base = directory_weights(llama)
    moved = 0
    for key in merged:
        assert torch.allclose(merged[key], peft_merged[key], rtol=0, atol=1e-5), key
        moved += not torch.equal(merged[key], base[key])
    assert moved == 2 + 2 + 1 + 1  # q_proj ×2, o_proj ×2, embed_tokens, lm_head
    # rsLoRA: o_proj's scale is alpha_pattern 3 / sqrt(4)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    delta = 3 / math.sqrt(4) * lora["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].double() @ lora["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].double()
    got = tau.get("model.layers.1.self_attn.o_proj.weight").double()
    assert (got - delta).abs().max() <= _factor_tolerance(delta, delta)


def test_import_fan_in_fan_out_gpt2(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores [in, out]: PEFT sets fan_in_fan_out and ΔW = (B·A)^T."""
    base = _gpt2(tmp_path / "gpt2")
    adapter = _adapter(base, tmp_path / "ad", 3, r=2, lora_alpha=4, target_modules=["c_attn"])
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    code, _, err = run_cli("import", adapter, "-o", tmp_path / "tau.safetensors")
    assert code == 0, err
    code, _, err = run_cli("add", tmp_path / "tau.safetensors", "-o", tmp_path / "merged.safetensors")
    assert code == 0, err
    merged, _ = load_tensors(tmp_path / "merged.safetensors")
    peft_merged = _peft_merged(base, adapter)
    for key in merged:
        assert torch.allclose(merged[key], peft_merged[key], rtol=0, atol=1e-5), key
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"], directory_weights(base)["transformer.h.0.attn.c_attn.weight"])


def test_two_imported_adapters_merge_with_ties_like_dense_vectors(llama: Path, tmp_path: Path) -> None:
    from tvedit.manifest import Manifest
    from tvedit.writer import save_tensors

    taus = []
    for i, targets in enumerate((["q_proj", "v_proj"], ["q_proj", "up_proj"])):
        adapter = _adapter(llama, tmp_path / f"ad{i}", 10 + i, r=2, lora_alpha=2, target_modules=targets)
        code, _, err = run_cli("import", adapter, "-o", tmp_path / f"tau{i}.safetensors")
        assert code == 0, err
        taus.append(tmp_path / f"tau{i}.safetensors")
    dense = []
    for i, t in enumerate(taus):  # the same vectors stored dense
        tensors, manifest = load_tensors(t)
        dense.append(save_tensors(tmp_path / f"dense{i}.safetensors", tensors, Manifest.from_dict({**manifest.to_dict(), "sparse": {}, "layout": "dense"})).path)
    for name, inputs in (("lr", taus), ("dense", dense)):
        code, _, err = run_cli("add", *inputs, "--method", "ties", "--option", "density=0.5", "--alpha", "0.7", "-o", tmp_path / f"ties_{name}.safetensors")
        assert code == 0, err
    a, _ = load_tensors(tmp_path / "ties_lr.safetensors")
    b, _ = load_tensors(tmp_path / "ties_dense.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    base = directory_weights(llama)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(a["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])


def test_import_bad_adapters(llama: Path, tmp_path: Path) -> None:
    adapter = _adapter(llama, tmp_path / "ad", 4, r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "tau.safetensors"
    # a directory without adapter_config.json: exit 3
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("import", tmp_path / "empty", "-o", out)
    assert code == 3 and "adapter_config.json" in err and len(err.strip().splitlines()) == 1
    # an adapter for another base: a missing key (GPT-2) or another shape (4 key/value heads): exit 4 naming the key
    gpt2 = _gpt2(tmp_path / "gpt2")
    code, _, err = run_cli("import", adapter, "--base", gpt2, "-o", out)
    assert code == 4 and "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in err, err
    other = write_tiny_llama(tmp_path / "other", dtype="float32", num_key_value_heads=2)
    code, _, err = run_cli("import", adapter, "--base", other, "-o", out)
    assert code == 4 and "v_proj.lora_A.weight" in err and "[16, 16]" in err, err
    assert not out.exists()
    # DoRA: refused in one line
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    code, _, err = run_cli("import", adapter, "-o", out)
    assert code == 3 and "DoRA" in err and len(err.strip().splitlines()) == 1
    # a base that is not local: --base is needed
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/not-here"}))
    code, _, err = run_cli("import", adapter, "-o", out)
    assert code == 2 and "--base" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def _extract(base: Path, finetuned: Path, out: Path) -> Path:
    code, _, err = run_cli("extract", finetuned, "--base", base, "-o", out)
    assert code == 0, err
    return out


def test_export_full_rank_loads_in_peft_and_merges_to_theta0_plus_tau(llama: Path, tmp_path: Path) -> None:
    ft = finetuned_copy(llama, tmp_path / "ft", seed=5, scale=0.05)
    tau = _extract(llama, ft, tmp_path / "tau.safetensors")
    code, out, err = run_cli("export-lora", tau, "--base", llama, "--rank", 64, "--modules-to-save", "-o", tmp_path / "adapter", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["relative_error"] < 1e-6 and not report["dropped"]
    assert report["modules_to_save"] == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in config["target_modules"] and "lm_head" in config["target_modules"]
    merged = _peft_merged(llama, tmp_path / "adapter")
    theta0, theta1 = directory_weights(llama), directory_weights(ft)
    for key, w in theta1.items():
        assert torch.allclose(merged[key], w, rtol=0, atol=1e-5), key  # θ0 + τ
    assert "Truncation error per tensor" in (tmp_path / "adapter" / "README.md").read_text()
    assert any(not torch.equal(merged[k], theta0[k]) for k in theta0)


def test_export_truncated_rank_reports_the_error_it_makes(llama: Path, tmp_path: Path) -> None:
    ft = finetuned_copy(llama, tmp_path / "ft", seed=6, scale=0.05)
    tau = _extract(llama, ft, tmp_path / "tau.safetensors")
    code, out, err = run_cli("export-lora", tau, "--base", llama, "--rank", 2, "-o", tmp_path / "adapter", "--json")
    assert code == 0, err
    report = json.loads(out)
    dropped = {d["key"] for d in report["dropped"]}
    assert dropped == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight", "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"}
    merged = _peft_merged(llama, tmp_path / "adapter")
    theta0, theta1 = directory_weights(llama), directory_weights(ft)
    err_sq = norm_sq = 0.0
    rows = {r["key"]: r for r in report["tensors"]}
    for key in theta0:
        t = (theta1[key] - theta0[key]).double()
        got = (merged[key] - theta0[key]).double()
        e = float((t - got).norm())
        err_sq, norm_sq = err_sq + e**2, norm_sq + float(t.norm()) ** 2
        if key in rows:
            assert rows[key]["rank"] == 2
            assert rows[key]["relative_error"] == pytest.approx(e / float(t.norm()), rel=1e-4, abs=1e-6), key
        else:
            assert key in dropped and torch.equal(merged[key], theta0[key])
    assert report["relative_error"] == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-4)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "model.norm.weight" in card and f"{report['relative_error']:.6g}" in card


def test_export_energy_gives_per_module_ranks_and_gpt2_conv1d(tmp_path: Path) -> None:
    """--energy picks a rank per matrix (rank_pattern/alpha_pattern in the config); GPT-2's Conv1D
    weights go out with fan_in_fan_out and come back as θ0 + τ."""
    base = _gpt2(tmp_path / "gpt2")
    theta0 = directory_weights(base)
    g = torch.Generator().manual_seed(0)
    tau = {k: torch.zeros_like(v) for k, v in theta0.items()}
    tau["transformer.h.0.attn.c_attn.weight"] = torch.randn(16, 1, generator=g) @ torch.randn(1, 48, generator=g)  # rank 1
    tau["transformer.h.1.mlp.c_fc.weight"] = 0.1 * torch.randn(16, 64, generator=g)  # full rank 16
    from tvedit.manifest import Manifest, base_ref

    ckpt = open_checkpoint(base)
    save_path = tmp_path / "tau.safetensors"
    from tvedit.writer import save_tensors

    save_tensors(save_path, tau, Manifest(kind="task-vector", base=base_ref(ckpt.sha256, str(base))))
    code, out, err = run_cli("export-lora", save_path, "--base", base, "--energy", 1.0, "-o", tmp_path / "adapter", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {r["key"]: r["rank"] for r in report["tensors"]} == {"transformer.h.0.attn.c_attn.weight": 1, "transformer.h.1.mlp.c_fc.weight": 16}
    assert report["zero_tensors"] == len(theta0) - 2
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    assert {config["r"], *config["rank_pattern"].values()} == {1, 16}
    merged = _peft_merged(base, tmp_path / "adapter")
    for key, w in theta0.items():
        assert torch.allclose(merged[key], w + tau[key], rtol=0, atol=1e-5), key


def test_export_refuses_bad_input(llama: Path, tmp_path: Path) -> None:
    ft = finetuned_copy(llama, tmp_path / "ft", seed=7)
    tau = _extract(llama, ft, tmp_path / "tau.safetensors")
    other = write_tiny_llama(tmp_path / "other", seed=1, dtype="float32")
    code, _, err = run_cli("export-lora", tau, "--base", other, "--rank", 2, "-o", tmp_path / "a")
    assert code == 4 and "recorded" in err
    code, _, err = run_cli("export-lora", tau, "--base", llama, "-o", tmp_path / "a")
    assert code == 2 and "--rank" in err
    code, _, err = run_cli("export-lora", ft, "--base", llama, "--rank", 2, "-o", tmp_path / "a")
    assert code == 3
    assert not (tmp_path / "a").exists()


def test_import_lora_bias_and_pickled_adapter(tmp_path: Path) -> None:
    """lora_bias adds scale·lora_B.bias to the bias; an adapter_model.bin (older PEFT) is read with
    torch.load(weights_only=True) and gives the same vector as its safetensors twin."""
    base = _gpt2(tmp_path / "gpt2")
    adapter = _adapter(base, tmp_path / "ad", 8, r=2, lora_alpha=6, target_modules=["c_proj"], lora_bias=True)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    state = {k: (v + 0.5 if k.endswith("lora_B.bias") else v) for k, v in state.items()}  # a trained (non-zero) bias
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli("import", adapter, "-o", tmp_path / "tau.safetensors")
    assert code == 0, err
    tau, _ = load_tensors(tmp_path / "tau.safetensors")
    bias = state["base_model.model.transformer.h.1.mlp.c_proj.lora_B.bias"]
    assert torch.allclose(tau["transformer.h.1.mlp.c_proj.bias"], 3.0 * bias, rtol=0, atol=1e-6)
    code, _, err = run_cli("add", tmp_path / "tau.safetensors", "-o", tmp_path / "merged.safetensors")
    assert code == 0, err
    merged, _ = load_tensors(tmp_path / "merged.safetensors")
    peft_merged = _peft_merged(base, adapter)
    for key in merged:
        assert torch.allclose(merged[key], peft_merged[key], rtol=0, atol=1e-5), key
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    torch.save(state, pickled / "adapter_model.bin")
    code, _, err = run_cli("import", pickled, "-o", tmp_path / "tau_bin.safetensors")
    assert code == 0, err
    again, _ = load_tensors(tmp_path / "tau_bin.safetensors")
    assert all(torch.equal(again[k], tau[k]) for k in tau)
