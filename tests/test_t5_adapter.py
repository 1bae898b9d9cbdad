"""The hf-seq2seq adapter on a tiny random T5: rebuild, regimes' keys, rank classification,
linearization, and the round trip to a Hugging Face directory."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.tiny_t5 import first_letter_examples, write_tiny_t5
from tvedit import arith
from tvedit.data.text import TextExample, TextTaskSpec, parse_example
from tvedit.errors import InputError, MismatchError, OutputError
from tvedit.manifest import Manifest
from tvedit.models import adapter_for, linearized
from tvedit.models.hf_seq2seq import export_directory, init_from_directory, sequence_loglik
from tvedit.reader import load_tensors
from tvedit.writer import save_tensors


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded (and do not fight over a shared machine's cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t5")
    hf = write_tiny_t5(root / "tiny")
    base = root / "base.safetensors"
    init_from_directory(hf, base)
    return {"root": root, "hf": hf, "base": base}


def _adapter_and_model(base: Path):
    state, manifest = load_tensors(base)
    assert manifest is not None
    adapter = adapter_for(manifest.model)
    return adapter, adapter.build(state), state


def _examples(n: int = 6) -> list[TextExample]:
    return [parse_example(r, TextTaskSpec("t"), "x") for r in first_letter_examples(n, seed=5)]


def test_init_records_config_and_rebuilds_without_the_directory(tiny: dict[str, Path], tmp_path: Path) -> None:
    state, manifest = load_tensors(tiny["base"])
    assert manifest is not None and manifest.family == "hf-seq2seq"
    assert manifest.model["config"]["d_model"] == 32 and manifest.model["architecture"] == "T5ForConditionalGeneration"
    hf_keys = set(load_tensors(tiny["hf"] / "model.safetensors")[0])
    assert set(state) == hf_keys  # the checkpoint keys are the Hugging Face ones (tied weights once)
    # the ByT5 tokenizer needs no file: the model rebuilds from the manifest alone
    info = {**manifest.model, "tokenizer": {"class": "ByT5Tokenizer", "source": str(tmp_path / "gone")}}
    adapter = adapter_for(info)
    model = adapter.build(state)
    assert adapter.tokenizer("ab")["input_ids"] == [100, 101, 1]
    assert torch.equal(model.lm_head.weight, state["shared.weight"])
    with pytest.raises(MismatchError, match="missing"):
        adapter.build({k: v for k, v in state.items() if k != "shared.weight"})
    with pytest.raises(InputError, match="tokenizer"):
        adapter_for({**info, "tokenizer": {"class": "T5Tokenizer", "source": None}}).tokenizer  # noqa: B018


def test_regime_keys(tiny: dict[str, Path]) -> None:
    adapter, _, state = _adapter_and_model(tiny["base"])
    attn = adapter.trainable_keys("attn")
    # 2 encoder self-attention + 2 decoder self-attention + 2 decoder cross-attention blocks
    assert len(attn) == 6 * 4
    assert all(k.split(".")[-2] in "qkvo" and ("SelfAttention" in k or "EncDecAttention" in k) for k in attn)
    assert adapter.trainable_keys("attn", attn_bias=True) == attn  # T5 projections have no bias
    full = adapter.trainable_keys("full")
    assert full == adapter.trainable_keys("linearized") == sorted(state)
    mask = adapter.maskable_keys()
    assert adapter.trainable_keys("sparse") == mask
    assert not [k for k in mask if "shared" in k or "embed" in k or "relative_attention_bias" in k or "lm_head" in k]
    assert set(full) - set(mask) == {"shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    assert "encoder.final_layer_norm.weight" in mask and "decoder.block.1.layer.2.DenseReluDense.wo.weight" in mask


def test_scores_match_a_reference_and_rank_the_planted_choice(tiny: dict[str, Path]) -> None:
    adapter, model, _ = _adapter_and_model(tiny["base"])
    tok = adapter.tokenizer
    examples = _examples(3)
    choices = ("ok", "x" * 40)  # a 41-token answer is far less likely than a 3-token one
    head = adapter.make_head(None, {"choices": list(choices)})
    with torch.no_grad():
        scores = adapter.scores(model, examples, head)
        for i, ex in enumerate(examples):
            for j, choice in enumerate(choices):
                enc = tok([ex.input], return_tensors="pt")
                labels = tok([choice], return_tensors="pt")["input_ids"]
                loss = model(**enc, labels=labels).loss  # mean token NLL
                assert scores[i, j].item() == pytest.approx(-loss.item() * labels.shape[1], rel=1e-5)
    assert scores.argmax(dim=1).tolist() == [0, 0, 0]


def test_per_example_choices_pad_with_minus_inf(tiny: dict[str, Path]) -> None:
    adapter, model, _ = _adapter_and_model(tiny["base"])
    examples = [TextExample("q1", "b", ("a", "b", "c"), 1), TextExample("q2", "zz", ("x" * 30, "zz"), 1)]
    batch, labels = adapter.collate(examples)
    assert labels.tolist() == [1, 1] and "choice_ids" in batch.tensors
    with torch.no_grad():
        scores = adapter.scores(model, batch, None)
        alone = adapter.scores(model, examples[1:], None)
    assert scores.shape == (2, 3) and scores[1, 2] == float("-inf")
    torch.testing.assert_close(scores[1, :2], alone[0], rtol=1e-5, atol=1e-5)
    assert scores[1].argmax().item() == 1


def test_linearized_equals_base_at_theta0_and_matches_finite_differences(tiny: dict[str, Path]) -> None:
    adapter, model, _ = _adapter_and_model(tiny["base"])
    model = model.double()
    examples = _examples(2)
    head = adapter.make_head(None, {"choices": ["yes", "no"]})
    batch, _ = adapter.collate(examples, head)
    keys = adapter.trainable_keys("linearized")
    params = dict(model.named_parameters())
    theta0 = {k: params[k].detach().clone() for k in keys}

    def f(m: torch.nn.Module) -> torch.Tensor:
        return adapter.scores(m, batch, head)

    with torch.no_grad():
        base = f(model)
    torch.testing.assert_close(linearized(model, theta0, theta0, f), base, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.1 for k, v in theta0.items()}
    lin = linearized(model, theta0, {k: theta0[k] + direction[k] for k in keys}, f)
    # T5 computes its layer norms and attention softmax in float32 whatever the model dtype, which
    # bounds how closely central differences can agree (about 1e-3 here).
    eps = 1e-3
    from tvedit.models.base import functional

    plus = functional(model, {k: theta0[k] + eps * direction[k] for k in keys}, f)
    minus = functional(model, {k: theta0[k] - eps * direction[k] for k in keys}, f)
    torch.testing.assert_close(lin - base, (plus - minus) / (2 * eps), rtol=1e-2, atol=1e-2)
    assert (lin - base).abs().max() > 1.0  # the step is not trivially small


def test_generation_examples_score_their_target_and_the_loss_is_its_nll(tiny: dict[str, Path]) -> None:
    adapter, model, _ = _adapter_and_model(tiny["base"])
    examples = [TextExample("abc", "hello"), TextExample("de", "no")]
    batch, labels = adapter.collate(examples)
    assert labels.tolist() == [0, 0] and "target_ids" in batch.tensors
    with torch.no_grad():
        scores = adapter.scores(model, batch, None)
        assert scores.shape == (2, 1)
        for i, ex in enumerate(examples):
            enc = adapter.tokenizer([ex.input], return_tensors="pt")
            target = adapter.tokenizer([ex.target], return_tensors="pt")["input_ids"]
            ref = model(**enc, labels=target).loss * target.shape[1]
            assert scores[i, 0].item() == pytest.approx(-ref.item(), rel=1e-5)
        assert adapter.loss(scores, labels).item() == pytest.approx(-scores.sum().item())
    # with choices, the loss is the NLL of the labelled choice (the target string)
    ranked = _examples(4)
    head = adapter.make_head(None, {"choices": ["yes", "no"]})
    rb, rl = adapter.collate(ranked, head)
    with torch.no_grad():
        rs = adapter.scores(model, rb, head)
    assert adapter.loss(rs, rl).item() == pytest.approx(-sum(rs[i, y].item() for i, y in enumerate(rl.tolist())), rel=1e-6)
    ll = sequence_loglik(model, rb.tensors["input_ids"], rb.tensors["attention_mask"], head.ids[:1].repeat(4, 1), head.mask[:1].repeat(4, 1))
    torch.testing.assert_close(ll, rs[:, 0])


def test_token_batch_behaves_like_a_tensor_for_the_loop(tiny: dict[str, Path]) -> None:
    adapter, model, _ = _adapter_and_model(tiny["base"])
    batch, _ = adapter.collate(_examples(5), None)
    assert batch.shape[0] == len(batch) == 5
    part = batch[1:3].to("cpu", non_blocking=True)
    assert part.shape[0] == 2 and part.tensors["choice_ids"].shape[:2] == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(adapter.scores(model, part, None), adapter.scores(model, batch, None)[1:3], rtol=1e-5, atol=1e-5)
    # vmap over a TokenBatch gives per-example gradients (TaLoS calibration)
    from torch.func import grad, vmap

    from tvedit.models.base import forward_ad_safe, functional

    params = {k: v.detach() for k, v in model.named_parameters() if "DenseReluDense.wo" in k}

    def objective(p: dict[str, torch.Tensor], x) -> torch.Tensor:  # noqa: ANN001
        return torch.log_softmax(functional(model, p, lambda m: adapter.scores(m, x[None], None))[0], -1)[0]

    with forward_ad_safe():
        per_example = vmap(grad(objective), in_dims=(None, 0))(params, batch)
    single = grad(objective)(params, batch[3])
    for k in params:
        torch.testing.assert_close(per_example[k][3], single[k], rtol=1e-4, atol=1e-6)


def test_merged_model_exports_as_a_loadable_hf_directory(tiny: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    state, manifest = load_tensors(tiny["base"])
    assert manifest is not None
    g = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_tensors(tmp_path / "ft.safetensors", tuned, Manifest(kind="checkpoint", model=manifest.model))
    arith.extract([tmp_path / "ft.safetensors"], tiny["base"], tmp_path / "tau.safetensors")
    arith.negate([tmp_path / "tau.safetensors"], tmp_path / "neg.safetensors")
    merged = arith.add([tmp_path / "neg.safetensors"], tmp_path / "merged.safetensors", base=tiny["base"], alpha=0.5)
    out = export_directory(merged.path, tmp_path / "hf-out")

    adapter, ours, merged_state = _adapter_and_model(merged.path)
    theirs = AutoModelForSeq2SeqLM.from_pretrained(str(out), attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok(["hello there", "ab"], padding=True, return_tensors="pt")
    dec = tok(["yes", "no"], padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = ours(**enc, decoder_input_ids=dec).logits
        b = theirs(**enc, decoder_input_ids=dec).logits
    assert torch.equal(a, b)
    torch.testing.assert_close(theirs.encoder.block[0].layer[0].SelfAttention.q.weight, merged_state["encoder.block.0.layer.0.SelfAttention.q.weight"], rtol=0, atol=0)
    # --like copies that directory's config and tokenizer files verbatim
    like_out = export_directory(merged.path, tmp_path / "hf-like", like=tiny["hf"])
    assert (like_out / "config.json").read_text() == (tiny["hf"] / "config.json").read_text()
    with pytest.raises(OutputError, match="not empty"):
        export_directory(merged.path, out)
    with pytest.raises(InputError, match="task-vector"):
        export_directory(tmp_path / "tau.safetensors", tmp_path / "nope")
    shutil.rmtree(like_out)


def test_export_refuses_linearized_and_foreign_checkpoints(tiny: dict[str, Path], tmp_path: Path) -> None:
    state, manifest = load_tensors(tiny["base"])
    assert manifest is not None
    save_tensors(tmp_path / "lin.safetensors", state, Manifest(kind="checkpoint", model=manifest.model, regime="linearized"))
    with pytest.raises(MismatchError, match="linearized"):
        export_directory(tmp_path / "lin.safetensors", tmp_path / "o1")
    save_tensors(tmp_path / "plain.safetensors", state, Manifest(kind="checkpoint"))
    with pytest.raises(MismatchError, match="--like"):
        export_directory(tmp_path / "plain.safetensors", tmp_path / "o2")
    assert (export_directory(tmp_path / "plain.safetensors", tmp_path / "o3", like=tiny["hf"]) / "model.safetensors").exists()
