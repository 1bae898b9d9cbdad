"""mergekit recipes (`tvedit add recipe.yml`) against formulas written here from mergekit's semantics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from .conftest import make_state, perturb
from .tiny_hf import run_cli

SHAPES = {"a.mlp.weight": (24, 16), "a.attn.weight": (16, 16), "b.norm.weight": (300,), "c.bias": (7,)}


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    base = make_state(0, SHAPES)
    out = {"base": tmp_path / "base.safetensors"}
    save_file(base, str(out["base"]))
    for i in range(3):
        out[f"m{i}"] = tmp_path / f"m{i}.safetensors"
        save_file(perturb(base, i + 1, scale=0.1), str(out[f"m{i}"]))
    return out


def _recipe(tmp_path: Path, method: str, models: list[dict], **top) -> Path:
    data = {"merge_method": method, "base_model": "base.safetensors", "models": models, **top}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _merge(tmp_path: Path, recipe: Path, *extra: str) -> dict[str, torch.Tensor]:
    out = tmp_path / "out.safetensors"
    code, _, stderr = run_cli("add", recipe, "-o", out, "--force", *extra)
    assert code == 0, stderr
    return load_file(str(out))


def _taus(models: dict[str, Path], n: int = 3) -> tuple[dict, list[dict]]:
    base = load_file(str(models["base"]))
    fts = [load_file(str(models[f"m{i}"])) for i in range(n)]
    return base, [{k: f[k] - base[k] for k in base if base[k].is_floating_point()} for f in fts]


def ref_topk(t: torch.Tensor, d: float) -> torch.Tensor:
    if d >= 1:
        return t
    k = int(d * t.numel())
    flat = t.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda j: (-abs(float(flat[j])), j))[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.view(t.shape)


def ref_breadcrumbs(t: torch.Tensor, d: float, gamma: float) -> torch.Tensor:
    if d >= 1:
        return t
    n = t.numel()
    n_keep, n_top = int(d * n), int(gamma * n)
    n_bot = n - n_keep - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    flat = t.reshape(-1)
    asc = sorted(range(n), key=lambda j: (abs(float(flat[j])), j))
    keep = asc[n_bot : n - n_top] if n_top > 0 else []  # mergekit's sorted[n_bot:-0] is empty
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view(t.shape)


def ref_combine(deltas: list[torch.Tensor], w: list[float], ties: bool, normalize: bool, lam: float) -> torch.Tensor:
    wd = [x * wi for x, wi in zip(deltas, w, strict=True)]
    if ties:
        s = sum(wd)
        maj = torch.where(s >= 0, 1.0, -1.0)
        agree = [(torch.sign(x) == maj).float() for x in wd]
        mixed = sum(x * a for x, a in zip(wd, agree, strict=True))
        div = sum(a * wi for a, wi in zip(agree, w, strict=True))
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed = sum(wd)
        div = sum(w) if abs(sum(w)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / div
    return mixed * lam


def test_task_arithmetic_with_weights_lambda_and_filters(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "task_arithmetic", [
        {"model": "m0.safetensors", "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]}},
        {"model": "m1.safetensors", "parameters": {"weight": 0.5}},
        {"model": "m2.safetensors", "parameters": {"weight": -0.25}},
        {"model": "base.safetensors", "parameters": {"weight": 3.0}},  # the base among the models: skipped
    ], parameters={"lambda": 1.5, "normalize": True, "int8_mask": True})  # fmt: skip
    out = _merge(tmp_path, recipe)
    base, taus = _taus(models)
    for k in taus[0]:
        w = [0.2 if "mlp" in k else 0.7, 0.5, -0.25]
        expected = base[k] + ref_combine([t[k] for t in taus], w, False, True, 1.5)
        torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=0)
    assert torch.equal(out["position_ids"], base["position_ids"])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_recipes_go_in_chunks_with_the_same_bytes(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """task_arithmetic, and ties (each input's cut by a radix select over the chunks; ties at the
    cut by a running quota), give the same bytes with chunks of 131 entries as with whole tensors."""
    files = {name: load_file(str(models[name])) for name in ("base", "m0", "m1")}
    for name, value in (("base", 0.0), ("m0", 0.5), ("m1", 0.0)):  # tau = 0.5 exactly 12 times: ties straddle the cut
        files[name]["a.mlp.weight"][0, :12] = value
        save_file(files[name], str(models[name]))
    recipe = _recipe(tmp_path, method, [
        {"model": "m0.safetensors", "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}],
                                                   "density": [{"filter": "mlp", "value": 0.02}, {"value": 0.5}]}},
        {"model": "m1.safetensors", "parameters": {"weight": -0.5, "density": [{"filter": "attn", "value": 1.0}, {"value": 0.4}]}},
    ], parameters={"lambda": 1.5, "normalize": True})  # fmt: skip
    from tvedit import engine

    calls: list[str] = []
    real = engine.write_in_chunks
    monkeypatch.setattr(engine, "write_in_chunks", lambda w, key, *a, **k: (calls.append(key), real(w, key, *a, **k)))
    outs = []
    for mib in ("1024", "0.0005"):  # 0.0005 MiB: chunks of 131 entries (a.mlp.weight: 384, b.norm.weight: 300)
        monkeypatch.setenv("TVEDIT_CHUNK_MIB", mib)
        out = tmp_path / f"out-{mib}.safetensors"
        code, _, stderr = run_cli("add", recipe, "-o", out)
        assert code == 0, stderr
        outs.append(out.read_bytes())
    assert calls == ["a.attn.weight", "a.mlp.weight", "b.norm.weight"]  # the three tensors over 131 entries, in the second run
    assert outs[0] == outs[1]


@pytest.mark.parametrize(("method", "rescale"), [
    ("ties", True), ("dare_ties", True), ("dare_linear", False), ("breadcrumbs", False), ("breadcrumbs_ties", True),
    ("della", True), ("della_linear", False),
])  # fmt: skip
def test_every_recipe_method_goes_in_chunks_with_the_same_bytes(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, rescale: bool) -> None:
    """Every sparsifier in chunks of 128 and of 8 entries (DELLA's chunks whole rows of 16, or the
    whole 1-D tensor): magnitude and Breadcrumbs by exact cuts over the chunks (ties to the lower /
    higher index through the 12 tied entries), DARE and DELLA drawn chunk after chunk, l1 rescaling
    with exact norms summed over the chunks: the bytes of the whole-tensor run."""
    files = {name: load_file(str(models[name])) for name in ("base", "m0", "m1")}
    for name, value in (("base", 0.0), ("m0", 0.5), ("m1", 0.0)):
        files[name]["a.mlp.weight"][0, :12] = value
        files[name]["b.norm.weight"][100:112] = value
        save_file(files[name], str(models[name]))
    extra = {"gamma": 0.05} if method.startswith("breadcrumbs") else {"epsilon": 0.1} if method.startswith("della") else {}
    recipe = _recipe(tmp_path, method, [
        {"model": "m0.safetensors", "parameters": {"weight": 0.7, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}], **extra}},
        {"model": "m1.safetensors", "parameters": {"weight": -0.5, "density": 0.4, **extra}},
    ], parameters={"lambda": 1.5, "rescale": rescale})  # fmt: skip
    from tvedit import engine

    calls: list[str] = []
    real = engine.write_in_chunks
    monkeypatch.setattr(engine, "write_in_chunks", lambda w, key, *a, **k: (calls.append(key), real(w, key, *a, **k)))
    outs = []
    for mib in ("1024", "0.0005", "0.00006"):  # chunks of 128 and of 8 entries
        monkeypatch.setenv("TVEDIT_CHUNK_MIB", mib)
        calls.clear()
        out = tmp_path / f"out-{mib}.safetensors"
        code, _, stderr = run_cli("add", recipe, "-o", out)
        assert code == 0, stderr
        outs.append(out.read_bytes())
        assert calls == ([] if mib == "1024" else ["a.attn.weight", "a.mlp.weight", "b.norm.weight"]), (mib, calls)  # c.bias: 7 entries
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_deterministic_sparsifying_methods(method: str, models: dict[str, Path], tmp_path: Path) -> None:
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": [{"filter": "attn", "value": 0.3}, {"value": 0.8}]}, {"weight": 0.3, "density": 0.4}]
    top = {"parameters": {"gamma": 0.05}} if method.startswith("breadcrumbs") else {}
    recipe = _recipe(tmp_path, method, [{"model": f"m{i}.safetensors", "parameters": p} for i, p in enumerate(params)], **top)
    out = _merge(tmp_path, recipe)
    base, taus = _taus(models)
    for k in taus[0]:
        deltas = []
        for i, t in enumerate(taus):
            d = params[i]["density"]
            d = (0.3 if "attn" in k else 0.8) if isinstance(d, list) else d
            deltas.append(ref_topk(t[k], d) if method == "ties" else ref_breadcrumbs(t[k], d, 0.05))
        ties = method in ("ties", "breadcrumbs_ties")
        expected = base[k] + ref_combine(deltas, [p["weight"] for p in params], ties, method == "ties", 1.0)
        torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=0)
    if method.startswith("breadcrumbs"):
        assert torch.equal(out["c.bias"], base["c.bias"])  # 7 entries: gamma * 7 < 1 zeroes the vector, as mergekit


def test_dare_density_rescale_and_seed(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "dare_linear", [{"model": "m0.safetensors", "parameters": {"weight": 1.0, "density": 0.3}}])
    out = _merge(tmp_path, recipe)
    base, taus = _taus(models, 1)
    for k in ("a.mlp.weight", "b.norm.weight"):
        delta = out[k] - base[k]
        kept = delta != 0
        assert abs(kept.float().mean().item() - 0.3) < 0.1
        # l1 rescale (mergekit's rescale: true): the kept entries scaled by ||tau||_1 / ||tau * m||_1
        tau = taus[0][k]
        scale = tau.abs().sum() / tau[kept].abs().sum()
        torch.testing.assert_close(delta[kept], tau[kept] * scale, atol=1e-5, rtol=1e-5)
    again = _merge(tmp_path, recipe)
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = _merge(tmp_path, recipe, "--option", "seed=7")
    assert not torch.equal(other["a.mlp.weight"], out["a.mlp.weight"])
    # rescale: false keeps the raw values; dare_ties elects signs over the dropped vectors
    no = _recipe(tmp_path, "dare_ties", [{"model": f"m{i}.safetensors", "parameters": {"weight": 1.0, "density": 0.5}} for i in range(2)], parameters={"rescale": False})
    out = _merge(tmp_path, no)
    _, taus = _taus(models, 2)
    d = out["a.mlp.weight"] - base["a.mlp.weight"]
    t0, t1 = taus[0]["a.mlp.weight"], taus[1]["a.mlp.weight"]
    ok = torch.zeros_like(d, dtype=torch.bool)
    for x in (torch.zeros_like(t0), t0):  # every entry is a sum of a subset of the agreeing raw deltas
        for y in (torch.zeros_like(t1), t1):
            ok |= torch.isclose(d, x + y, atol=1e-6) | torch.isclose(d, x, atol=1e-6) | torch.isclose(d, y, atol=1e-6)
    assert bool(ok.all())


def test_della_keeps_larger_magnitudes_more_often(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(2, 4000)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.randn(2, 4000, generator=g)}, str(tmp_path / "m0.safetensors"))
    recipe = _recipe(tmp_path, "della_linear", [{"model": "m0.safetensors", "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.4}}], parameters={"lambda": 2.0})
    out = _merge(tmp_path, recipe)["w"]
    tau = load_file(str(tmp_path / "m0.safetensors"))["w"]
    kept = out != 0
    for row in range(2):
        ranks = tau[row].abs().argsort().argsort()  # 0 = smallest
        low, high = kept[row][ranks < 1000].float().mean(), kept[row][ranks >= 3000].float().mean()
        # p = 0.1 + 0.8 * rank / (n - 1): bottom quarter ~0.2, top quarter ~0.8
        assert abs(low.item() - 0.2) < 0.05 and abs(high.item() - 0.8) < 0.05
    scale = tau.abs().sum() / tau[kept].abs().sum()  # l1 over the whole tensor, then lambda
    torch.testing.assert_close(out[kept], 2.0 * tau[kept] * scale, atol=1e-4, rtol=1e-5)


def test_recipe_errors_are_one_line_before_any_read(tmp_path: Path) -> None:
    for name in ("base", "m0"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"not safetensors")  # reading them would be exit 3
    cases = {
        "slerp": ({}, "merge_method 'slerp'"),
        "ties": ({"slices": []}, "'slices'"),
        "dare_ties": ({"parameters": {"weight": [0.1, 0.9]}}, "gradients"),
        "della": ({"parameters": {"density": 0.9, "epsilon": 0.2}}, "epsilon"),
        "task_arithmetic": ({"parameters": {"gamma": 0.1}}, "'gamma'"),
        "breadcrumbs": ({"tokenizer_source": "union"}, "tokenizer_source"),
    }
    for method, (top, expect) in cases.items():
        recipe = _recipe(tmp_path, method, [{"model": "m0.safetensors", "parameters": {"weight": 1.0}}], **top)
        code, _, stderr = run_cli("add", recipe, "-o", tmp_path / "o.safetensors")
        assert code == 2, (method, stderr)
        assert len(stderr.strip().splitlines()) == 1 and expect in stderr and "recipe.yml" in stderr, stderr
    recipe = _recipe(tmp_path, "ties", [{"model": "m0.safetensors"}])
    code, _, stderr = run_cli("add", recipe, "-o", tmp_path / "o.safetensors")
    assert code == 2 and "weight" in stderr
    recipe = _recipe(tmp_path, "ties", [{"model": "m0.safetensors", "parameters": {"weight": 1.0}}])
    code, _, stderr = run_cli("add", recipe, "--alpha", "0.5", "-o", tmp_path / "o.safetensors")
    assert code == 2 and "--alpha" in stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_mergekit_recipe_to_hf_directory(tmp_path: Path) -> None:
    """The issue's done-when: a mergekit YAML over HF Llama directories -> a directory from_pretrained loads."""
    from transformers import AutoModelForCausalLM

    from .tiny_hf import finetuned_copy, write_tiny_llama

    base = write_tiny_llama(tmp_path / "base")
    for i in range(2):
        finetuned_copy(base, tmp_path / f"ft{i}", seed=i + 1)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(
        "merge_method: ties\nbase_model: base\ndtype: float32\nout_dtype: bfloat16\nmodels:\n"
        "  - model: ft0\n    parameters: {weight: 1.0, density: 0.5}\n  - model: ft1\n    parameters: {weight: 0.5, density: 0.5}\n"
    )
    code, _, stderr = run_cli("add", recipe, "-o", f"{tmp_path / 'out'}/")
    assert code == 0, stderr
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    b = load_file(str(base / "model.safetensors"))
    f = [load_file(str(tmp_path / f"ft{i}" / "model.safetensors")) for i in range(2)]
    k = "model.layers.1.self_attn.q_proj.weight"
    deltas = [ref_topk(x[k].float() - b[k].float(), 0.5) for x in f]
    expected = (b[k].float() + ref_combine(deltas, [1.0, 0.5], True, True, 1.0)).to(torch.bfloat16)
    assert torch.equal(model.state_dict()[k], expected)
    assert "ties" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_gta_merge_has_the_bits_of_the_stacked_formula(consensus: bool, normalize: bool) -> None:
    """The in-place merge (no stacked temporaries) gives the bits of mergekit's stack-and-sum
    formula, signed zeros included (half the entries are +-0)."""
    from tvedit.mergekit import gta_merge

    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(300, 200, generator=g) * (torch.rand(300, 200, generator=g) < 0.5) for _ in range(4)]
    w = [0.3, -0.7, 1.1, 0.25]
    copies = [t.clone() for t in taus]
    wd = [t * x for t, x in zip(taus, w, strict=True)]
    total = torch.stack(wd).sum(dim=0)
    if consensus:
        maj = torch.where(total >= 0, 1.0, -1.0)
        masks = [(torch.sign(x) == maj).float() for x in wd]
        mixed = torch.stack([x * m for x, m in zip(wd, masks, strict=True)]).sum(dim=0)
        div = torch.stack([m * x for m, x in zip(masks, w, strict=True)]).sum(dim=0)
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed, div = total, torch.tensor(sum(w))
    expected = (mixed / div if normalize else mixed) * 1.3
    out = gta_merge(taus, w, consensus=consensus, normalize=normalize, lam=1.3)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(copies, taus, strict=True))  # the inputs are not modified
