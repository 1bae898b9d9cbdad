"""The hf-causal family: tiny Llama-, GPT-2- and Qwen2-shaped causal LMs built locally (no download).
Choice scores equal a direct transformers computation of the continuation's log-likelihood (acc and
lm-eval's acc_norm), the attention regime is found by module role, embeddings and the LM head stay
frozen, every regime fine-tunes, and a merged HF directory is evaluated and gated without init."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tvedit.data.text import TextExample
from tvedit.finetune import run
from tvedit.finetune.config import FinetuneConfig
from tvedit.models import adapter_for
from tvedit.models.hf_causal import HFCausalAdapter
from tvedit.reader import load_tensors

from .tiny_hf import directory_weights, write_bpe_tokenizer, write_tiny_llama, write_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*args: object):
    from typer.testing import CliRunner

    from tvedit.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def write_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(str(path))
    write_tokenizer(path)
    return path


def write_tiny_qwen2(path: Path, seed: int = 0, tokenizer: str = "bpe") -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(str(path))
    (write_bpe_tokenizer if tokenizer == "bpe" else write_tokenizer)(path)
    return path


def examples(n: int, seed: int) -> list[dict]:
    """A learnable rule: the answer is the first word of the input."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first = rng.choice(["w10", "w11"])
        text = " ".join([first] + [f"w{rng.randint(20, 40)}" for _ in range(rng.randint(1, 4))])
        out.append({"input": text, "choices": ["w10", "w11"], "label": 0 if first == "w10" else 1})
    return out


def write_task(root: Path, name: str, records: list[dict], n_test: int = 12) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[n_test:]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:n_test]))
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal")
    return {
        "llama": write_tiny_llama(root / "llama", dtype="float32"),
        "gpt2": write_tiny_gpt2(root / "gpt2"),
        "qwen2": write_tiny_qwen2(root / "qwen2"),
    }


def _direct_loglik(model: torch.nn.Module, tok, context: str, choice: str) -> float:
    """log p(choice | context) by hand: BOS + context tokens, then the choice's tokens."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id, *ctx, *cont]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    start = 1 + len(ctx)
    return float(sum(logp[start + i - 1, t] for i, t in enumerate(cont)))


def test_from_directory_takes_only_its_own_kind(models: dict[str, Path], tmp_path: Path) -> None:
    """The causal and seq2seq adapters share from_directory; each refuses the other's kind, and a
    directory whose config transformers cannot read, in one line naming the directory."""
    from tests.tiny_t5 import write_tiny_t5
    from tvedit.errors import InputError
    from tvedit.models.hf_seq2seq import HFSeq2SeqAdapter

    t5 = write_tiny_t5(tmp_path / "t5")
    assert type(HFSeq2SeqAdapter.from_directory(t5)) is HFSeq2SeqAdapter
    assert type(HFCausalAdapter.from_directory(models["gpt2"])) is HFCausalAdapter
    with pytest.raises(InputError, match=r"'t5' is an encoder-decoder model \(the hf-seq2seq family\), not a causal LM"):
        HFCausalAdapter.from_directory(t5)
    with pytest.raises(InputError, match=r"'gpt2' is not an encoder-decoder"):
        HFSeq2SeqAdapter.from_directory(models["gpt2"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    for cls in (HFCausalAdapter, HFSeq2SeqAdapter):
        with pytest.raises(InputError) as err:
            cls.from_directory(broken)
        assert str(err.value).startswith(f"{broken}: cannot load the config or tokenizer: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_scores_equal_a_direct_transformers_computation(models: dict[str, Path], arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = HFCausalAdapter.from_directory(models[arch])
    model = adapter.build(load_tensors_from(models[arch]))
    ref = AutoModelForCausalLM.from_pretrained(str(models[arch]), attn_implementation="eager").float().eval()
    tok = AutoTokenizer.from_pretrained(str(models[arch]))
    exs = [TextExample("w1 w2 w3", "w5", ("w5", "w6 w7"), 0), TextExample("w9", "w8", ("w8", "w4", "w3 w3 w3"), 2)]
    for metric in ("acc", "acc_norm"):
        head = adapter.make_head(None, {"metric": metric})
        with torch.no_grad():
            got = adapter.scores(model, exs, head)
        assert got.shape == (2, 3) and torch.isinf(got[0, 2])  # the first example has two choices
        for i, ex in enumerate(exs):
            for j, choice in enumerate(ex.choices):
                want = _direct_loglik(ref, tok, ex.input, choice)
                assert want < 0, (arch, choice)  # the choice has tokens: a sum over none would be 0 = 0
                if metric == "acc_norm":
                    want /= len(choice)
                assert abs(float(got[i, j]) - want) <= 1e-4 * max(1.0, abs(want)), (arch, metric, i, j)


def test_a_choice_without_tokens_is_a_data_error(tmp_path: Path) -> None:
    """A tokenizer that cannot encode the choices (transformers 5's Qwen2Tokenizer drops a WordLevel
    vocabulary: every word is no tokens) would score every choice 0 and train on nothing: exit 8."""
    model = write_tiny_qwen2(tmp_path / "qwen2-wordlevel", tokenizer="wordlevel")
    task = write_task(tmp_path, "first", examples(20, 1))
    code, _, err = run_cli("evaluate", model, "--task", f"first={task}", "--device", "cpu")
    assert code == 8, err
    assert "has no tokens under this tokenizer" in err and "w1" in err


def load_tensors_from(directory: Path) -> dict[str, torch.Tensor]:
    from tvedit.reader import open_checkpoint

    ckpt = open_checkpoint(directory)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def test_regimes_by_module_role(models: dict[str, Path]) -> None:
    llama = HFCausalAdapter.from_directory(models["llama"])
    attn = llama.trainable_keys("attn")
    assert attn == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo")
    full = llama.trainable_keys("full")
    assert "model.embed_tokens.weight" not in full and "lm_head.weight" not in full and "model.norm.weight" in full
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(llama.maskable_keys())
    gpt2 = HFCausalAdapter.from_directory(models["gpt2"])
    assert gpt2.trainable_keys("attn") == sorted(f"transformer.h.{i}.attn.{p}.weight" for i in range(2) for p in ("c_attn", "c_proj"))
    assert not {"transformer.wte.weight", "transformer.wpe.weight"} & set(gpt2.trainable_keys("full"))
    assert "transformer.h.0.mlp.c_fc.weight" in gpt2.maskable_keys()
    qwen = HFCausalAdapter.from_directory(models["qwen2"])
    assert "model.layers.0.self_attn.q_proj.bias" in qwen.trainable_keys("attn", attn_bias=True)
    assert "model.embed_tokens.weight" not in qwen.trainable_keys("full")  # tied with the head: frozen
    trained = HFCausalAdapter.from_model_info({**qwen.model_info(), "train_embeddings": True})
    assert "model.embed_tokens.weight" in trained.trainable_keys("full")


def test_attn_regime_unknown_architecture_is_one_line(tmp_path: Path) -> None:
    from transformers import MambaConfig

    config = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1).to_dict()
    adapter = HFCausalAdapter(config, {"class": "PreTrainedTokenizerFast", "source": None})
    from tvedit.errors import MismatchError

    with pytest.raises(MismatchError, match="MambaForCausalLM"):
        adapter.trainable_keys("attn")


def test_train_embeddings_flag_trains_them_and_is_recorded(models: dict[str, Path], tmp_path: Path) -> None:
    """finetune --train-embeddings: the embeddings and LM head change (frozen without it), the
    output's model record says so; on a family without frozen embeddings it is a usage error."""
    theta0 = tmp_path / "theta0.safetensors"
    code, _, err = run_cli("init", "--model", models["llama"], "-o", theta0)
    assert code == 0, err
    base, _ = load_tensors(theta0)
    task = write_task(tmp_path, "first", examples(24, 1))
    code, _, err = run_cli("finetune", "-p", theta0, "--train", task, "--mode", "full", "--steps", "2", "--batch-size", "8", "--warmup", "1",
                           "--lr", "1e-2", "--device", "cpu", "--train-embeddings", "-o", tmp_path / "emb.safetensors")  # fmt: skip
    assert code == 0, err
    tuned, manifest = load_tensors(tmp_path / "emb.safetensors")
    assert manifest.model["train_embeddings"] is True
    assert not torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(tuned["lm_head.weight"], base["lm_head.weight"])
    from tvedit.errors import UsageError

    shipped = Path(__file__).resolve().parents[1] / "examples" / "theta0" / "tiny_clip.safetensors"  # an open_clip theta0
    with pytest.raises(UsageError, match="--train-embeddings"):
        run.finetune(None, str(shipped), task, tmp_path / "clip.safetensors", _cfg("full", train_embeddings=True))
    assert not (tmp_path / "clip.safetensors").exists()


def _cfg(mode: str, **kw: object) -> FinetuneConfig:
    base: dict[str, object] = dict(mode=mode, steps=4, batch_size=8, lr=1e-2, warmup=1, device="cpu", rounds=1, calib_batches=1, density=0.2, calib_chunk=4)
    return FinetuneConfig(**{**base, **kw}).validate()  # type: ignore[arg-type]


@pytest.mark.slow
def test_every_regime_fine_tunes_and_the_merge_is_gated(models: dict[str, Path], tmp_path: Path) -> None:
    """init --model DIR, four regimes on a Llama-shaped model (frozen embeddings/head, attention only
    for attn, zero outside the mask for sparse), then add -> HF directory -> evaluate + gate."""
    theta0 = tmp_path / "theta0.safetensors"
    code, _, err = run_cli("init", "--model", models["llama"], "-o", theta0)
    assert code == 0, err
    base, manifest = load_tensors(theta0)
    assert manifest.family == "hf-causal"
    task = write_task(tmp_path, "first", examples(60, 1))
    taus = {}
    for mode in ("full", "attn", "linearized", "sparse"):
        out = tmp_path / f"{mode}.safetensors"
        run.finetune(None, str(theta0), task, out, _cfg(mode), force=True)
        tuned, m = load_tensors(out)
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        assert changed, mode
        assert not changed & {"model.embed_tokens.weight", "lm_head.weight"}, mode
        if mode == "attn":
            assert all(".self_attn." in k for k in changed)
        if mode == "sparse":
            mask, _ = load_tensors(tmp_path / "sparse.mask.safetensors")
            for k in changed:
                assert not bool((tuned[k] - base[k])[~mask[k]].any()), k
        assert m.regime == ("linearized" if mode == "linearized" else "nonlinear")
        taus[mode] = out
    code, _, err = run_cli("extract", taus["full"], "--base", theta0, "-o", tmp_path / "full.tv.safetensors")
    assert code == 0, err
    # -o DIR/ without --like: config and tokenizer from the directory theta0's model record names (init --model DIR)
    code, _, err = run_cli("add", tmp_path / "full.tv.safetensors", "--alpha", "1.0", "-o", f"{tmp_path / 'merged'}/")
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    code, _, err = run_cli("add", tmp_path / "full.tv.safetensors", "--alpha", "1.0", "-o", f"{tmp_path / 'merged-like'}/", "--like", models["llama"])
    assert code == 0, err
    assert (tmp_path / "merged-like" / "config.json").read_text() == (tmp_path / "merged" / "config.json").read_text()
    assert directory_weights(tmp_path / "merged-like").keys() == directory_weights(tmp_path / "merged").keys()
    # the merged HF directory: evaluated as it is (no init) and gated
    code, out, err = run_cli("evaluate", tmp_path / "merged", "--task", f"first={task}", "--device", "cpu", "--json")
    assert code == 0, err
    acc = json.loads(out.splitlines()[0])["accuracy"]
    code, _, err = run_cli("evaluate", tmp_path / "merged", "--task", f"first={task}", "--device", "cpu", "--min-accuracy", f"first={min(1.0, acc + 0.01)}")
    assert code == 7
    code, _, err = run_cli("evaluate", tmp_path / "merged", "--task", f"first={task}", "--device", "cpu", "--min-accuracy", f"first={acc}")
    assert code == 0, err
    # and fine-tuned from as it is (no init)
    run.finetune(None, str(tmp_path / "merged"), task, tmp_path / "again.safetensors", _cfg("attn", steps=1), force=True)
    assert adapter_for(load_tensors(tmp_path / "again.safetensors")[1].model).family == "hf-causal"


def test_a_merge_of_hf_directories_evaluates_without_init(models: dict[str, Path], tmp_path: Path) -> None:
    """add ft/ --base base/ -o merged/ records the plain HF family; evaluate reads the family from
    its config.json, and its accuracy equals that of the same weights through init."""
    from .tiny_hf import finetuned_copy

    for name in ("gpt2", "qwen2"):
        ft = finetuned_copy(models[name], tmp_path / f"{name}-ft", seed=3, scale=0.02)
        code, _, err = run_cli("add", ft, "--base", models[name], "--alpha", "0.5", "-o", f"{tmp_path / (name + '-merged')}/")
        assert code == 0, err
        task = write_task(tmp_path, "first", examples(30, 2))
        code, out, err = run_cli("evaluate", tmp_path / f"{name}-merged", "--task", f"first={task}", "--device", "cpu", "--json")
        assert code == 0, err
        direct = json.loads(out.splitlines()[0])["accuracy"]
        code, _, err = run_cli("init", "--model", tmp_path / f"{name}-merged", "-o", tmp_path / f"{name}.safetensors")
        assert code == 0, err
        code, out, err = run_cli("evaluate", tmp_path / f"{name}.safetensors", "--task", f"first={task}", "--device", "cpu", "--json")
        assert code == 0, err
        assert json.loads(out.splitlines()[0])["accuracy"] == direct


def test_metrics_acc_norm_and_perplexity_match_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    """evaluate --metric acc_norm / perplexity on a Llama-shaped model: the numbers equal a direct
    transformers computation; --max-perplexity gates (exit 7), a text file with nothing usable is exit 8."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theta0 = tmp_path / "theta0.safetensors"
    code, _, err = run_cli("init", "--model", models["llama"], "-o", theta0)
    assert code == 0, err
    ref = AutoModelForCausalLM.from_pretrained(str(models["llama"]), attn_implementation="eager").float().eval()
    tok = AutoTokenizer.from_pretrained(str(models["llama"]))
    records = [{"input": f"w{i} w{i + 1}", "choices": ["w3", "w4 w5 w6"], "label": i % 2} for i in range(8)]
    task = write_task(tmp_path, "norm", records + records, n_test=8)
    for metric in ("acc", "acc_norm"):
        code, out, err = run_cli("evaluate", theta0, "--task", f"norm={task}", "--metric", metric, "--device", "cpu", "--json")
        assert code == 0, err
        want = 0
        for r in records:
            ll = [_direct_loglik(ref, tok, r["input"], c) / (len(c) if metric == "acc_norm" else 1) for c in r["choices"]]
            want += int(max(range(2), key=lambda j: ll[j]) == r["label"])
        assert json.loads(out.splitlines()[0])["accuracy"] == want / len(records), metric
    texts = ["w5 w6 w7 w8", "w9 w10", "w11"]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    code, out, err = run_cli("evaluate", theta0, "--task", f"text={tmp_path / 'text.jsonl'}", "--metric", "perplexity", "--device", "cpu", "--json")
    assert code == 0, err
    row = json.loads(out.splitlines()[0])
    nll = count = 0.0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]])
            logp = torch.log_softmax(ref(input_ids=ids).logits[0, :-1].double(), dim=-1)
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert row["tokens"] == count and abs(row["nll"] - nll) <= 1e-4 * nll
    assert abs(row["perplexity"] - math.exp(nll / count)) <= 1e-4 * row["perplexity"]
    ppl = row["perplexity"]
    code, _, err = run_cli("evaluate", theta0, "--task", f"text={tmp_path / 'text.jsonl'}", "--metric", "perplexity", "--device", "cpu", "--max-perplexity", f"text={ppl * 0.99}")
    assert code == 7 and "perplexity" in err
    code, _, err = run_cli("evaluate", theta0, "--task", f"text={tmp_path / 'text.jsonl'}", "--metric", "perplexity", "--device", "cpu", "--max-perplexity", f"text={ppl * 1.01}")
    assert code == 0, err
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    code, _, err = run_cli("evaluate", theta0, "--task", f"text={tmp_path / 'empty.jsonl'}", "--metric", "perplexity", "--device", "cpu")
    assert code == 8 and "empty.jsonl" in err
    code, _, err = run_cli("evaluate", theta0, "--task", f"norm={task}", "--metric", "perplexity", "--min-accuracy", "norm=0.5")
    assert code == 2


def test_target_tasks_score_exact_match_of_greedy_decoding(models: dict[str, Path], tmp_path: Path) -> None:
    """A task of {input, target} examples: accuracy = the fraction whose greedy decoding (as many
    tokens as the target) is the target, as transformers' generate(do_sample=False) decodes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(models["gpt2"]), attn_implementation="eager").float().eval()
    tok = AutoTokenizer.from_pretrained(str(models["gpt2"]))
    records = []
    for i in range(6):
        ids = torch.tensor([[tok.bos_token_id, *tok(f"w{i} w{i + 3}", add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            gen = ref.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
        greedy = tok.decode(gen, skip_special_tokens=True).strip()
        records.append({"input": f"w{i} w{i + 3}", "target": greedy if i % 2 == 0 else "w50 w51"})
    task = write_task(tmp_path, "gen", records + records, n_test=6)
    code, out, err = run_cli("evaluate", models["gpt2"], "--task", f"gen={task}", "--device", "cpu", "--json")
    assert code == 0, err
    want = sum(1 for r in records if r["target"] != "w50 w51" or tok.decode(ref.generate(torch.tensor([[tok.bos_token_id, *tok(r["input"], add_special_tokens=False)["input_ids"]]]), max_new_tokens=2, do_sample=False, pad_token_id=0)[0, -2:]).strip() == "w50 w51")
    assert json.loads(out.splitlines()[0])["accuracy"] == want / len(records)
    assert want >= 3
