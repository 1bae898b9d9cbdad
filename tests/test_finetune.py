"""tvedit finetune / calibrate / init on a tiny CLIP: properties of every regime, resume, errors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.tiny_clip import make_image_folder, write_config
from tvedit.errors import DataError, MismatchError, OutputError, UsageError
from tvedit.finetune import run
from tvedit.finetune.calibration import calibrate_mask, round_densities, select_lowest
from tvedit.finetune.config import FinetuneConfig
from tvedit.finetune.optim import MaskedAdamW, lr_at
from tvedit.models.base import ModelAdapter
from tvedit.reader import load_tensors, open_checkpoint

FAST = {"batch_size": 8, "steps": 4, "warmup": 1, "lr": 1e-3, "log_every": 1}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    cfg = write_config(root)
    data = make_image_folder(root / "colours", classes=3, per_class=10)
    theta0 = run.init(str(cfg), "none", root / "theta0.safetensors", seed=0).path
    return {"root": root, "config": cfg, "data": data, "theta0": theta0}


def _ft(env: dict[str, Path], out: str, **kw: Any) -> list:
    opts = {**FAST, **{k: v for k, v in kw.items() if k in FinetuneConfig.__dataclass_fields__}}
    extra = {k: v for k, v in kw.items() if k not in FinetuneConfig.__dataclass_fields__}
    return run.finetune(None, str(env["theta0"]), env["data"], env["root"] / out, FinetuneConfig(**opts).validate(), **extra)


def _diff_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_full_mode_learns_and_keeps_the_head_frozen(env):
    arts = _ft(env, "full.safetensors", mode="full", steps=12, lr=2e-3)
    log = [json.loads(line) for line in (env["root"] / "full.train.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12 and {"loss", "lr", "examples_per_s"} <= set(log[0])
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    theta0, _ = load_tensors(env["theta0"])
    ft, manifest = load_tensors(arts[0].path)
    changed = _diff_keys(ft, theta0)
    assert changed and all(k.startswith("visual.") for k in changed)  # text tower and logit_scale frozen
    assert manifest.kind == "checkpoint" and manifest.regime == "nonlinear"
    assert manifest.base["sha256"] == open_checkpoint(env["theta0"]).sha256
    assert manifest.task["classes"] == ["blue", "green", "red"] and manifest.task["templates"] == ["a photo of a {}."]
    assert manifest.task["split"]["n_heldout"] == 3 and manifest.task["split"]["seed"] == 0
    params = manifest.provenance[-1]["params"]
    assert params["mode"] == "full" and params["lr"] == 2e-3 and params["weight_decay"] == 0.1


def test_attn_mode_changes_only_attention_projections(env):
    arts = _ft(env, "attn.safetensors", mode="attn")
    theta0, _ = load_tensors(env["theta0"])
    ft, _ = load_tensors(arts[0].path)
    changed = _diff_keys(ft, theta0)
    expected = {k for k in theta0 if k.startswith("visual.") and k.endswith(("attn.in_proj_weight", "attn.out_proj.weight"))}
    assert changed == expected and len(expected) == 4


def test_linearized_mode_is_marked_and_emits_a_vector(env):
    arts = _ft(env, "lin.tv.safetensors", mode="linearized", steps=2, emit="vector")
    tau, manifest = load_tensors(arts[0].path)
    assert manifest.kind == "task-vector" and manifest.regime == "linearized"
    assert manifest.provenance[-1]["params"]["flin"] == "features"  # the encoder, normalised afterwards
    assert any(tau[k].abs().sum() > 0 for k in tau if k.startswith("visual."))
    assert all(tau[k].abs().sum() == 0 for k in tau if not k.startswith("visual."))


def test_sparse_mode_trains_only_the_mask(env):
    arts = _ft(env, "sparse.safetensors", mode="sparse", density=0.1, rounds=2, calib_batches=2, calib_batch_size=4, lr=1e-2)
    ft_art, mask_art = arts
    assert mask_art.kind == "mask" and mask_art.path.name == "sparse.mask.safetensors"
    masks, mmanifest = load_tensors(mask_art.path)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(0.1 * total) and mmanifest.density == pytest.approx(0.1, abs=1 / total)
    theta0, _ = load_tensors(env["theta0"])
    ft, manifest = load_tensors(ft_art.path)
    moved = 0
    for k, t in ft.items():
        tau = t - theta0[k] if t.is_floating_point() else None
        if k in masks:
            assert torch.all(tau[~masks[k]] == 0), k  # exactly zero outside the mask (weight decay too)
            moved += int((tau[masks[k]] != 0).sum())
        elif tau is not None:
            assert torch.all(tau == 0), k
    assert moved > 0.5 * kept
    assert manifest.provenance[-1]["inputs"][-1]["kind"] == "mask"
    # the same mask reused through --mask gives the same weights
    again = _ft(env, "sparse2.safetensors", mode="sparse", mask=mask_art.path, lr=1e-2)
    assert len(again) == 1 and _diff_keys(load_tensors(again[0].path)[0], ft) == set()


def test_calibrate_is_deterministic_and_recorded(env):
    cfg = FinetuneConfig(batch_size=8, density=0.05, rounds=2, calib_batches=2, calib_batch_size=4, seed=3)
    a = run.calibrate(None, str(env["theta0"]), env["data"], env["root"] / "m1.safetensors", cfg)[0]
    b = run.calibrate(None, str(env["theta0"]), env["data"], env["root"] / "m2.safetensors", cfg)[0]
    assert a.sha256 == b.sha256
    c = run.calibrate(None, str(env["theta0"]), env["data"], env["root"] / "m3.safetensors", FinetuneConfig(**{**cfg.params(), "seed": 4}))[0]
    assert c.sha256 != a.sha256
    assert a.manifest.provenance[-1]["params"]["seed"] == 3 and a.manifest.base["sha256"] == open_checkpoint(env["theta0"]).sha256


def test_resume_gives_the_same_weights(env):
    whole = _ft(env, "whole.safetensors", mode="full", steps=6)[0]
    assert _ft(env, "resumed.safetensors", mode="full", steps=6, checkpoint_every=2, stop_after=3) == []
    assert (env["root"] / "resumed.resume" / "state.safetensors").exists()
    resumed = _ft(env, "resumed.safetensors", mode="full", steps=6, checkpoint_every=2, resume=True)[0]
    assert resumed.sha256 == whole.sha256
    assert not (env["root"] / "resumed.resume").exists()
    with pytest.raises(UsageError, match="different run"):
        _ft(env, "resumed2.safetensors", mode="full", steps=6, stop_after=2)
        _ft(env, "resumed2.safetensors", mode="full", steps=7, resume=True)


def test_early_stopping_keeps_the_best_weights(env, monkeypatch):
    """Planted validation losses: best at step 2, then two worse -> stop at step 4 with step 2's weights."""
    from safetensors.torch import load_file

    planted = iter([3.0, 2.0, 2.5, 2.6, 1.0, 1.0])

    def fake_validation(*args, **kwargs):
        return lambda: next(planted)

    ref = _ft(env, "at2.safetensors", mode="full", steps=6, stop_after=2)
    assert ref == []
    at2 = load_file(str(env["root"] / "at2.resume" / "state.safetensors"))
    monkeypatch.setattr(run, "_validation", fake_validation)
    out = _ft(env, "early.safetensors", mode="full", steps=6, eval_every=1, patience=2)[0]
    tuned, manifest = load_tensors(out.path)
    for k, v in tuned.items():
        if f"param/{k}" in at2:
            assert torch.equal(v, at2[f"param/{k}"]), k
    log = [json.loads(x) for x in (env["root"] / "early.train.jsonl").read_text().splitlines()]
    vals = [r for r in log if "val_loss" in r]
    assert [r["val_loss"] for r in vals] == [3.0, 2.0, 2.5, 2.6]
    assert vals[-1]["early_stop"] is True and vals[-1]["best_step"] == 2
    assert manifest.provenance[-1]["params"]["patience"] == 2


def test_validation_loss_is_logged_and_resume_keeps_the_tracker(env):
    whole = _ft(env, "v_whole.safetensors", mode="full", steps=6, eval_every=2, patience=1)[0]
    log = [json.loads(x) for x in (env["root"] / "v_whole.train.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals and all(v == v and 0 < v < 10 for v in vals)  # finite cross-entropies
    assert _ft(env, "v_res.safetensors", mode="full", steps=6, eval_every=2, patience=1, stop_after=3) == []
    resumed = _ft(env, "v_res.safetensors", mode="full", steps=6, eval_every=2, patience=1, resume=True)[0]
    assert resumed.sha256 == whole.sha256
    with pytest.raises(UsageError, match="needs --eval-every"):
        FinetuneConfig(patience=3).validate()


# ------------------------------------------------------------------------------------------------
# TaLoS pieces on a toy adapter with a planted high-sensitivity tensor
# ------------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.sensitive = nn.Parameter(torch.randn(3, 6) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x))) + 50.0 * x @ self.sensitive.T


class ToyAdapter(ModelAdapter):
    family = "toy"

    def model_info(self) -> dict[str, Any]:
        return {"family": "toy"}

    @classmethod
    def from_model_info(cls, info: Mapping[str, Any]) -> ToyAdapter:
        return cls()

    def build(self, state: Mapping[str, Tensor] | None = None) -> nn.Module:
        torch.manual_seed(0)
        return Toy()

    def trainable_keys(self, mode: str, *, attn_bias: bool = False) -> list[str]:
        return self.maskable_keys()

    def maskable_keys(self) -> list[str]:
        return ["a.weight", "b.weight", "sensitive"]

    def make_head(self, model: nn.Module, task: Mapping[str, Any]) -> Any:
        return None

    def scores(self, model: nn.Module, inputs: Any, head: Any) -> Tensor:
        return model(inputs)


def test_mask_prefers_low_fisher_entries():
    adapter = ToyAdapter()
    model = adapter.build()
    g = torch.Generator().manual_seed(0)
    batches = iter([torch.randn(16, 6, generator=g) for _ in range(4)])
    mask = calibrate_mask(adapter, model, None, batches, density=0.5, rounds=2, calib_batches=4, seed=0)
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.5 * total)
    assert not mask["sensitive"].any()  # the planted high-sensitivity tensor is pruned entirely
    for variant in ("sampled", "logit"):
        batches = iter([torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)])
        again = calibrate_mask(adapter, model, None, batches, density=0.5, rounds=2, calib_batches=4, seed=0, variant=variant)
        assert not again["sensitive"].any()


def test_select_lowest_is_global_and_excludes_pruned():
    scores = {"a": torch.tensor([1.0, 5.0, 2.0]), "b": torch.tensor([[0.5, 9.0], [3.0, 2.0]])}
    alive = {"a": torch.tensor([True, True, False]), "b": torch.ones(2, 2, dtype=torch.bool)}
    keep = select_lowest(scores, alive, 3)
    assert keep["a"].tolist() == [True, False, False]  # a[2] has a low score but is already pruned
    assert keep["b"].tolist() == [[True, False], [False, True]]
    ties = select_lowest({"x": torch.zeros(5)}, {"x": torch.ones(5, dtype=torch.bool)}, 2)
    assert ties["x"].tolist() == [True, True, False, False, False]  # ties: earlier entries first
    assert round_densities(0.1, 4) == pytest.approx([0.5623, 0.3162, 0.1778, 0.1], abs=1e-4)


def test_masked_adamw_matches_torch_and_freezes_masked_entries():
    torch.manual_seed(0)
    p_ref = nn.Parameter(torch.randn(5, 4))
    p = nn.Parameter(p_ref.detach().clone())
    ref = torch.optim.AdamW([p_ref], lr=0.1, weight_decay=0.1)
    opt = MaskedAdamW({"p": p}, weight_decay=0.1)
    mask = torch.rand(5, 4) > 0.5
    pm = nn.Parameter(p_ref.detach().clone())
    opt_m = MaskedAdamW({"p": pm}, {"p": mask}, weight_decay=0.1)
    start = pm.detach().clone()
    kept_ref = nn.Parameter(start[mask].clone())  # torch's AdamW on the kept entries alone
    ref_kept = torch.optim.AdamW([kept_ref], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(5, 4)
        p_ref.grad, p.grad, pm.grad = grad.clone(), grad.clone(), grad.clone()
        kept_ref.grad = grad[mask].clone()
        ref.step()
        ref_kept.step()
        opt.step(0.1)
        opt_m.step(0.1)
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(pm[mask], kept_ref.detach())
    assert torch.equal(pm[~mask], start[~mask]) and not torch.equal(pm[mask], start[mask])
    assert opt_m.exp_avg["p"].numel() == int(mask.sum())  # state only for kept entries
    assert lr_at(0, 1.0, 4, 10) == 0.25 and lr_at(4, 1.0, 4, 10) == 1.0 and lr_at(10, 1.0, 4, 10) == pytest.approx(0.0)
    # the constant-lr control: the same warm-up, then the base rate to the end
    assert [lr_at(s, 1.0, 4, 10, "constant") for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    with pytest.raises(UsageError, match="schedule"):
        FinetuneConfig(schedule="linear").validate()


@pytest.mark.parametrize("scope", ["full", "kept"])
def test_sparse_clips_by_the_chosen_gradient_norm(scope):
    """clip_scope full (the authors' code): the clip coefficient comes from the norm of the full
    gradient of every mask tensor, pruned entries and tensors with no kept entry included; kept:
    from the masked gradient. Either way only kept entries get a gradient."""
    from tests.tiny_clip import TINY_CONFIG
    from tvedit.finetune.loop import Dist, train_step
    from tvedit.finetune.regimes import make_regime
    from tvedit.models.open_clip import OpenClipAdapter

    adapter = OpenClipAdapter("tiny", TINY_CONFIG)
    torch.manual_seed(0)
    state = adapter.state_dict(adapter.build())
    g = torch.Generator().manual_seed(0)
    keys = adapter.maskable_keys()
    masks = {k: torch.rand(dict(adapter.param_shapes())[k], generator=g) < 0.3 for k in keys}
    for k in keys[:3]:
        masks[k][...] = False  # tensors without a kept entry
    head = torch.randn(3, TINY_CONFIG["embed_dim"]) * 10
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    cfg = FinetuneConfig(grad_clip=1e-3, clip_scope=scope).validate()

    ref_model = adapter.build(state)
    named = dict(ref_model.named_parameters())
    for p in ref_model.parameters():
        p.requires_grad_(False)
    for k in keys:
        named[k].requires_grad_(True)
    (adapter.loss(adapter.scores(ref_model, x, head), y) / 4).backward()
    full = {k: named[k].grad for k in keys}
    masked = {k: full[k] * masks[k] for k in keys}
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in (full if scope == "full" else masked).values()))
    coef = min(1.0, cfg.grad_clip / (float(norm) + 1e-6))
    assert coef < 0.1  # clipping is active

    model = adapter.build(state)
    regime = make_regime("sparse", adapter, model, masks=masks, clip_scope=scope)
    assert not set(keys[:3]) & set(regime.params)
    seen = {}

    class Capture:
        def step(self, lr):
            seen.update({k: p.grad.clone() for k, p in regime.params.items()})

        def zero_grad(self):
            pass

    train_step(regime, Capture(), head, x, y, 1.0, cfg, local_batch=4, micro=4, dist=Dist())  # type: ignore[arg-type]
    for k, grad in seen.items():
        torch.testing.assert_close(grad, masked[k] * coef, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in regime.clip_extra.values())
    assert bool(regime.clip_extra) == (scope == "full")


# ------------------------------------------------------------------------------------------------
# bad input: one clear error before training starts
# ------------------------------------------------------------------------------------------------
def test_bad_inputs(env, tmp_path):
    one = make_image_folder(tmp_path / "one", classes=1, per_class=3)
    with pytest.raises(DataError, match="one class"):
        run.finetune(None, str(env["theta0"]), one, tmp_path / "x.safetensors", FinetuneConfig(**FAST))
    broken = make_image_folder(tmp_path / "broken", classes=2, per_class=2)
    (broken / "red" / "000.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty image"):
        run.finetune(None, str(env["theta0"]), broken, tmp_path / "x.safetensors", FinetuneConfig(**FAST))
    (broken / "red" / "000.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="unreadable image"):
        run.finetune(None, str(env["theta0"]), broken, tmp_path / "x.safetensors", FinetuneConfig(**FAST))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        run.finetune(None, str(env["theta0"]), tmp_path / "empty", tmp_path / "x.safetensors", FinetuneConfig(**FAST))
    with pytest.raises(UsageError, match="unknown open_clip model"):
        run.finetune("ViT-Nope-9", "none", env["data"], tmp_path / "x.safetensors", FinetuneConfig(**FAST))
    theta0, _ = load_tensors(env["theta0"])
    from safetensors.torch import save_file

    save_file({k: v for k, v in theta0.items() if k != "visual.proj"}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MismatchError, match="visual.proj"):
        run.finetune(str(env["config"]), str(tmp_path / "plain.safetensors"), env["data"], tmp_path / "x.safetensors", FinetuneConfig(**FAST))
    with pytest.raises(OutputError):
        run.finetune(None, str(env["theta0"]), env["data"], env["theta0"], FinetuneConfig(**FAST))
    with pytest.raises(UsageError, match="density"):
        FinetuneConfig.load(None, density=1.5)
    with pytest.raises(UsageError, match="unknown fine-tuning option"):
        FinetuneConfig.load(None, learning_rate=1.0)
    assert not (tmp_path / "x.safetensors").exists()


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("lr: 3.0e-4\nsteps: 50\nwarm-up: 5\n".replace("warm-up", "warmup"))
    cfg = FinetuneConfig.load(path, steps=7, lr=None)
    assert (cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay) == (3e-4, 7, 5, 0.1)


def test_config_file_values_take_their_field_types(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("eps: 1e-8\nlr: 1e-3\nsteps: 5.0\nmicro_batch: null\n")  # YAML 1.1 reads 1e-8 as a string
    cfg = FinetuneConfig.load(path)
    assert (cfg.eps, cfg.lr, cfg.steps, cfg.micro_batch) == (1e-8, 1e-3, 5, None)
    assert isinstance(cfg.eps, float) and isinstance(cfg.steps, int)
    for bad, match in [("eps: abc", "--eps: 'abc' is not a number"), ("steps: 2.5", "--steps: 2.5 is not a whole number"),
                       ("lr: .nan", "--lr: nan is not a finite number"), ("grad_checkpointing: 3", "--grad-checkpointing: expected true or false"),
                       ("mode: [full]", "--mode: expected a string"), ("steps: true", "--steps: expected a number")]:  # fmt: skip
        path.write_text(bad + "\n")
        with pytest.raises(UsageError, match=re.escape(match)):
            FinetuneConfig.load(path)


# ------------------------------------------------------------------------------------------------
# the CLI: finetune outputs are accepted by extract / add
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_finetune_then_extract_and_add(env, cli, tmp_path):
    proc = cli("finetune", "--pretrained", str(env["theta0"]), "--train", str(env["data"]), "--mode", "attn", "-o", "ft.safetensors",
               "--steps", "2", "--batch-size", "8", "--warmup", "1", "--lr", "1e-3", check=True)  # fmt: skip
    rec = json.loads(proc.stdout.splitlines()[0])
    assert rec["kind"] == "checkpoint" and rec["manifest"]["model"]["family"] == "open_clip"
    proc = cli("extract", "ft.safetensors", "--base", str(env["theta0"]), "-o", "tau.safetensors", check=True)
    tau, manifest = load_tensors(tmp_path / "tau.safetensors")
    assert manifest.kind == "task-vector" and manifest.task["name"] == "colours"
    cli("add", "tau.safetensors", "--base", str(env["theta0"]), "-o", "merged.safetensors", check=True)
    merged, _ = load_tensors(tmp_path / "merged.safetensors")
    ft, _ = load_tensors(tmp_path / "ft.safetensors")
    for k in ft:
        torch.testing.assert_close(merged[k], ft[k])
    bad = cli("finetune", "--model", "ViT-Nope-9", "--pretrained", "none", "--train", str(env["data"]), "-o", "y.safetensors")
    assert bad.returncode == 2 and "unknown open_clip model" in bad.stderr


# ------------------------------------------------------------------------------------------------
# data: lists, class names, splits, templates
# ------------------------------------------------------------------------------------------------
def test_lists_class_names_splits_and_templates(env, tmp_path):
    from tvedit.data import load_image_data, resolve_templates, split_indices

    folder = load_image_data(env["data"])
    rows = [(str(p.relative_to(env["data"])), folder.classes[y]) for p, y in zip(folder.paths, folder.labels, strict=True)]
    (env["data"] / "list.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    (env["data"] / "list.jsonl").write_text("".join(json.dumps({"path": p, "label": lab}) + "\n" for p, lab in rows))
    for name in ("list.csv", "list.jsonl"):
        listed = load_image_data(env["data"] / name)
        assert listed.classes == folder.classes and listed.labels == folder.labels
    (tmp_path / "names.yaml").write_text("red: bright red\n")
    named = load_image_data(env["data"], tmp_path / "names.yaml")
    assert named.classes == ["blue", "green", "bright red"]
    (tmp_path / "bad.csv").write_text("file,y\na.png,1\n")
    with pytest.raises(DataError, match="path"):
        load_image_data(tmp_path / "bad.csv")
    train, held = split_indices(1000)
    assert len(held) == 100 and not set(train) & set(held) and sorted(train + held) == list(range(1000))
    assert split_indices(1000) == (train, held) and split_indices(1000, seed=1) != (train, held)
    assert len(split_indices(100_000)[1]) == 5000
    assert len(resolve_templates("EuroSAT")) == 3 and len(resolve_templates("resisc45")) == 18 and len(resolve_templates("dtd")) == 8
    assert resolve_templates("something") == ["a photo of a {}."]


def test_alpha_widening_reads_the_mask_files_density(env):
    """A sparse run with --mask records the density of that mask (not --density), and a vector made
    by ``mask apply`` records its mask's: evaluation widens the alpha grid by exactly that."""
    from tvedit.evaluate.runner import _density
    from tvedit.masking import mask as run_mask

    cfg = FinetuneConfig(batch_size=8, density=0.05, rounds=2, calib_batches=2, calib_batch_size=4, seed=0)
    m = run.calibrate(None, str(env["theta0"]), env["data"], env["root"] / "k05.mask.safetensors", cfg)[0]
    mask_density = open_checkpoint(m.path).manifest.density
    assert mask_density == pytest.approx(0.05, abs=1e-3)
    arts = _ft(env, "k05.tv.safetensors", mode="sparse", mask=m.path, density=0.3, emit="vector")
    assert _density(open_checkpoint(arts[0].path).manifest) == pytest.approx(mask_density, rel=1e-12)
    full = _ft(env, "full-for-mask.tv.safetensors", mode="full", emit="vector")[0]
    assert _density(open_checkpoint(full.path).manifest) is None
    from tvedit.keys import KeyFilter

    keys = KeyFilter(include=tuple(open_checkpoint(m.path).keys()), zero_unselected=True)
    applied = run_mask("apply", [full.path], env["root"] / "applied.tv.safetensors", mask_file=m.path, keys_filter=keys)
    out = applied.outputs[0].path
    assert _density(open_checkpoint(out).manifest) == pytest.approx(mask_density, rel=1e-12)
