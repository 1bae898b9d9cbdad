"""The adapter interface: registry, strict loading, open_clip keys and head, the jvp linearization."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_clip import TINY_CONFIG
from tvedit.errors import InputError, MismatchError, UsageError
from tvedit.models.base import adapter_for, functional, linearized, linearized_reference
from tvedit.models.open_clip import OpenClipAdapter


@pytest.fixture(scope="module")
def tiny() -> tuple[OpenClipAdapter, torch.nn.Module]:
    adapter = OpenClipAdapter("tiny", TINY_CONFIG)
    torch.manual_seed(0)
    return adapter, adapter.build()


def test_registry_round_trip(tiny):
    adapter, model = tiny
    again = adapter_for(adapter.model_info())
    assert isinstance(again, OpenClipAdapter) and again.model_info() == adapter.model_info()
    rebuilt = again.build(adapter.state_dict(model))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values(), strict=True))
    with pytest.raises(MismatchError, match="unknown model family"):
        adapter_for({"family": "nope"})
    with pytest.raises(InputError):
        adapter_for({"family": "unknown"})
    with pytest.raises(UsageError, match="unknown open_clip model"):
        OpenClipAdapter.from_name("ViT-Nope-1")


def test_strict_load_names_the_key(tiny):
    adapter, model = tiny
    state = adapter.state_dict(model)
    bad = dict(state)
    bad.pop("visual.proj")
    with pytest.raises(MismatchError, match="visual.proj"):
        adapter.build(bad)
    bad = dict(state, **{"visual.conv1.weight": torch.zeros(1, 2, 3)})
    with pytest.raises(MismatchError, match="visual.conv1.weight"):
        adapter.build(bad)
    with pytest.raises(MismatchError, match="extra.key"):
        adapter.build(dict(state, **{"extra.key": torch.zeros(1)}))


def test_keys_per_mode(tiny):
    adapter, model = tiny
    names = {k for k, _ in model.named_parameters()}
    full = adapter.trainable_keys("full")
    assert set(full) == {k for k in names if k.startswith("visual.")}
    attn = adapter.trainable_keys("attn")
    assert attn and all(k.endswith(("attn.in_proj_weight", "attn.out_proj.weight")) for k in attn)
    assert len(attn) == 2 * TINY_CONFIG["vision_cfg"]["layers"]
    with_bias = adapter.trainable_keys("attn", attn_bias=True)
    assert set(with_bias) - set(attn) == {k.replace("in_proj_weight", "in_proj_bias").replace("out_proj.weight", "out_proj.bias") for k in attn}
    maskable = set(adapter.maskable_keys())
    assert not maskable & {"visual.class_embedding", "visual.positional_embedding", "visual.proj"}
    assert "visual.conv1.weight" in maskable and "visual.ln_pre.weight" in maskable
    assert not any(not k.startswith("visual.") for k in maskable)


def test_head_is_normalised_and_scaled(tiny):
    adapter, model = tiny
    head = adapter.make_head(model, {"classes": ["red", "blue"], "templates": ["a {}.", "the {} thing."]})
    scale = model.logit_scale.exp().item()
    assert head.shape == (2, TINY_CONFIG["embed_dim"]) and not head.requires_grad
    torch.testing.assert_close(head.norm(dim=-1), torch.full((2,), scale))
    # reference: fill, encode, normalise, average, normalise
    tok = adapter.tokenizer()
    with torch.no_grad():
        e = model.encode_text(tok(["a red.", "the red thing."]))
        e = e / e.norm(dim=-1, keepdim=True)
        ref = e.mean(0) / e.mean(0).norm() * scale
    torch.testing.assert_close(head[0], ref)


def test_linearized_matches_f_and_finite_differences(tiny):
    adapter, model = tiny
    model = adapter.build(adapter.state_dict(model)).double()
    head = torch.randn(3, TINY_CONFIG["embed_dim"], dtype=torch.float64)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    keys = adapter.trainable_keys("linearized")
    named = dict(model.named_parameters())
    theta0 = {k: named[k].detach().clone() for k in keys}
    g = torch.Generator().manual_seed(1)
    delta = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 1e-3 for k, v in theta0.items()}

    def fn(m):
        return adapter.scores(m, x, head)

    f0 = fn(model).detach()
    torch.testing.assert_close(linearized(model, theta0, theta0, fn).detach(), f0)  # f_lin(theta0) = f(theta0)
    eps = 1e-3
    plus = functional(model, {k: theta0[k] + eps * delta[k] for k in keys}, fn).detach()
    minus = functional(model, {k: theta0[k] - eps * delta[k] for k in keys}, fn).detach()
    jd_fd = (plus - minus) / (2 * eps)
    lin = linearized(model, theta0, {k: theta0[k] + delta[k] for k in keys}, fn).detach()
    torch.testing.assert_close(lin - f0, jd_fd, rtol=1e-5, atol=1e-7)
    assert (lin - f0).abs().max() > 1e-4  # a non-trivial direction


def test_linearized_is_differentiable_in_theta(tiny):
    adapter, model = tiny
    head = torch.randn(3, TINY_CONFIG["embed_dim"])
    x = torch.randn(2, 3, 32, 32)
    keys = adapter.trainable_keys("attn")
    named = dict(model.named_parameters())
    theta0 = {k: named[k].detach().clone() for k in keys}
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    linearized(model, theta0, theta, lambda m: adapter.scores(m, x, head)).sum().backward()
    assert all(theta[k].grad is not None and theta[k].grad.abs().sum() > 0 for k in keys)


@pytest.mark.parametrize("mode", ["linearized", "attn"])
def test_linearized_logits_and_gradients_match_the_reverse_over_forward_reference(tiny, mode):
    """linearized() backpropagates through f at theta0 instead of through the jvp: same values,
    same gradients in theta (float64, a point away from theta0, a non-linear loss)."""
    adapter, model = tiny
    model = adapter.build(adapter.state_dict(model)).double().train()
    head = torch.randn(5, TINY_CONFIG["embed_dim"], dtype=torch.float64)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 4, 2])
    keys = adapter.trainable_keys(mode)
    named = dict(model.named_parameters())
    theta0 = {k: named[k].detach().clone() for k in keys}
    g = torch.Generator().manual_seed(2)
    grads = []
    outs = []
    for impl in (linearized, linearized_reference):
        theta = {k: (theta0[k] + 0.05 * torch.randn(v.shape, generator=g.manual_seed(2), dtype=v.dtype)).requires_grad_(True) for k, v in theta0.items()}
        out = impl(model, theta0, theta, lambda m: adapter.scores(m, x, head))
        torch.nn.functional.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append({k: theta[k].grad for k in keys})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    assert (outs[0] - adapter.scores(model, x, head).detach()).abs().max() > 1e-3  # theta is away from theta0
    for k in keys:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-9, atol=1e-12)
    assert sum(float(v.abs().sum()) for v in grads[0].values()) > 0


def test_linearized_regime_trains_theta_and_keeps_theta0(tiny):
    """Through the regime and the training step: the model's parameters hold theta, get the
    reference gradient, and theta0 (the linearization point) does not move."""
    from tvedit.finetune.regimes import make_regime

    adapter, model = tiny
    model = adapter.build(adapter.state_dict(model)).double().train()
    regime = make_regime("linearized", adapter, model)
    theta0 = {k: v.clone() for k, v in regime.theta0.items()}
    with torch.no_grad():
        for p in regime.params.values():
            p.add_(torch.randn_like(p) * 0.01)
    head = torch.randn(4, TINY_CONFIG["embed_dim"], dtype=torch.float64)
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    torch.nn.functional.cross_entropy(regime.logits(x, head), y).backward()
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in regime.params.items()}
    feats = linearized_reference(model, theta0, theta, lambda m: adapter.features(m, x, head))
    torch.nn.functional.cross_entropy(adapter.head_logits(feats, head), y).backward()
    for k, p in regime.params.items():
        torch.testing.assert_close(p.grad, theta[k].grad, rtol=1e-9, atol=1e-12)
        assert torch.equal(regime.theta0[k], theta0[k])


def test_scores_are_the_head_of_the_features(tiny):
    """open_clip splits its forward: features = encode_image (not normalised), head_logits =
    normalise then inner product; scores is their composition."""
    adapter, model = tiny
    head = torch.randn(3, TINY_CONFIG["embed_dim"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = adapter.features(model, x, head)
        torch.testing.assert_close(feats, model.encode_image(x))
        assert not torch.allclose(feats.norm(dim=-1), torch.ones(2))  # not normalised
        ref = (feats / feats.norm(dim=-1, keepdim=True)) @ head.T
        torch.testing.assert_close(adapter.scores(model, x, head), ref)
        torch.testing.assert_close(adapter.head_logits(feats, head), ref)
    assert adapter.flin == "features"


def test_flin_is_the_linearized_encoder_normalised_afterwards(tiny):
    """ALGORITHMS.md section 2 / the tangent-space paper's appendix: f_lin(x; theta) =
    normalise(g(theta0) + J_g(theta0)(theta - theta0)) @ head.T with g the image encoder. The
    training regime's logits and gradients against that formula written out here in float64 (the
    encoder's jvp by torch.func, independently of tvedit's one-pass helper), and the jvp itself
    against central finite differences with a tolerance from Richardson's estimate."""
    from torch.func import jvp

    from tvedit.finetune.regimes import make_regime

    adapter, model = tiny
    model = adapter.build(adapter.state_dict(model)).double().train()
    regime = make_regime("linearized", adapter, model)
    names = sorted(regime.theta0)
    theta0 = {k: v.clone() for k, v in regime.theta0.items()}
    g = torch.Generator().manual_seed(3)
    delta = {k: 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta0.items()}
    with torch.no_grad():
        for k, p in regime.params.items():
            p.add_(delta[k])
    head = torch.randn(4, TINY_CONFIG["embed_dim"], dtype=torch.float64) * 10
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3, 0])

    out = regime.logits(x, head)
    torch.nn.functional.cross_entropy(out, y).backward()

    def encoder(*values):
        return functional(model, dict(zip(names, values, strict=True)), lambda m: m.encode_image(x))

    theta = {k: (theta0[k] + delta[k]).requires_grad_(True) for k in names}
    with torch.no_grad():  # the model's own parameters hold theta now: theta0 explicitly
        g0 = encoder(*(theta0[k] for k in names))
    from tvedit.models.base import forward_ad_safe

    with forward_ad_safe():
        _, jd = jvp(encoder, tuple(theta0[k] for k in names), tuple(theta[k] - theta0[k] for k in names))
    lin = g0 + jd
    ref = (lin / lin.norm(dim=-1, keepdim=True)) @ head.T
    torch.nn.functional.cross_entropy(ref, y).backward()
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-10, atol=1e-10)
    for k in names:
        torch.testing.assert_close(regime.params[k].grad, theta[k].grad, rtol=1e-9, atol=1e-12)

    # the jvp is J delta: central differences D(eps) err ~ c eps^2, so |D(eps) - D(eps/2)| * 4/3
    # estimates the error of D(eps/2); allow twice that plus float64 rounding of the differences
    with torch.no_grad():
        def central(eps):
            plus = encoder(*(theta0[k] + eps * delta[k] for k in names))
            minus = encoder(*(theta0[k] - eps * delta[k] for k in names))
            return (plus - minus) / (2 * eps)

        d1, d2 = central(1e-3), central(5e-4)
        tol = float((d1 - d2).abs().max()) * 8 / 3 + 1e-9 * float(g0.abs().max()) / 5e-4
        assert float((jd.detach() - d2).abs().max()) <= tol
        assert float(jd.abs().max()) > 100 * tol  # a non-trivial direction

    # not the old definition (linearizing the normalised scores): the two differ away from theta0
    old = linearized_reference(model, theta0, {k: theta0[k] + delta[k] for k in names}, lambda m: adapter.scores(m, x, head))
    assert float((old.detach() - out.detach()).abs().max()) > 1e-3


def test_attn_on_a_tower_without_attention_is_an_error():
    """--mode attn on a ModifiedResNet image tower (no visual.transformer) is a one-line
    MismatchError (exit 4), not a run that trains nothing."""
    resnet = {**TINY_CONFIG, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}}
    adapter = OpenClipAdapter("tiny-rn", resnet)
    assert adapter.trainable_keys("full")  # the tower itself is fine
    with pytest.raises(MismatchError, match="--mode attn.*tiny-rn.*has none") as exc:
        adapter.trainable_keys("attn")
    assert exc.value.exit_code == 4 and "\n" not in str(exc.value)
