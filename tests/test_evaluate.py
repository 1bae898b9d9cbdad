"""tvedit evaluate on a tiny open_clip model: accuracy, sweeps, f_lin, protocols end to end, gates, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tvedit.manifest import Manifest, base_ref
from tvedit.writer import save_tensors

TINY = {
    "embed_dim": 16,
    "vision_cfg": {
        "image_size": 16,
        "layers": 1,
        "width": 32,
        "head_width": 16,
        "patch_size": 8,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 8,
        "vocab_size": 49408,
        "width": 16,
        "heads": 2,
        "layers": 1,
        "mlp_ratio": 2.0,
    },
}
CLASSES = {"a": ["red", "green", "blue"], "b": ["dark", "light"]}


def _image_folder(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8)
            px[..., c % 3] = 200 + c  # a class-dependent channel, so accuracy is not degenerate
            Image.fromarray(px.numpy()).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """theta0 (with manifest), two task vectors (one per task) and two tasks with train/test folders."""
    from tvedit.models.open_clip import OpenClipAdapter

    root = tmp_path_factory.mktemp("tiny")
    adapter = OpenClipAdapter("tiny", TINY)
    torch.manual_seed(0)
    state = adapter.state_dict(adapter.build())
    base = root / "base.safetensors"
    art = save_tensors(base, state, Manifest(kind="checkpoint", model=adapter.model_info()))
    paths = {"base": base}
    g = torch.Generator().manual_seed(1)
    for i, task in enumerate(("a", "b")):
        tau = {
            k: (
                0.05 * torch.randn(v.shape, generator=g)
                if k.startswith("visual.")
                else torch.zeros_like(v)
            )
            for k, v in state.items()
            if v.is_floating_point()
        }
        m = Manifest(
            kind="task-vector",
            model=adapter.model_info(),
            base=base_ref(art.sha256, str(base)),
            task={"name": task, "classes": CLASSES[task], "templates": ["a photo of a {}."]},
        )
        paths[f"tau_{task}"] = root / f"tau_{task}.safetensors"
        save_tensors(paths[f"tau_{task}"], tau, m)
        _image_folder(root / task / "train", CLASSES[task], 10, seed=10 + i)
        _image_folder(root / task / "test", CLASSES[task], 6, seed=20 + i)
        paths[task] = root / task
    return paths


def _session(tiny: dict[str, Path], linearize: bool = False, which: tuple[str, ...] = ("a", "b")):
    from tvedit.evaluate import open_session

    return open_session(
        [tiny[f"tau_{t}"] for t in which],
        {t: tiny[t] for t in which},
        tiny["base"],
        linearize=linearize,
    )


def test_accuracy_matches_hand_computed(tiny: dict[str, Path]) -> None:
    """Accuracy of theta0 on the test split equals argmax(normalised image features @ head) by hand."""
    from tvedit.data import load_image_data
    from tvedit.models.open_clip import OpenClipAdapter
    from tvedit.reader import load_tensors

    s = _session(tiny)
    state, manifest = load_tensors(tiny["base"])
    adapter = OpenClipAdapter.from_model_info(manifest.model)
    model = adapter.build(state)
    data = load_image_data(tiny["a"] / "test")
    tf = adapter.transform(train=False)
    x = torch.stack([tf(Image.open(p)) for p in data.paths])
    with torch.no_grad():
        feats = model.encode_image(x)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        tok = adapter.tokenizer()([f"a photo of a {c}." for c in CLASSES["a"]])
        text = model.encode_text(tok)
        text = text / text.norm(dim=-1, keepdim=True)
        pred = (feats @ text.T).argmax(-1)
    expected = float((pred == torch.tensor(data.labels)).float().mean())
    assert s.accuracy("a", "test", [0.0, 0.0]) == pytest.approx(expected)
    assert s.accuracy("a", "test", [], []) == pytest.approx(expected)


def test_alpha_zero_is_theta0_and_edit_matches_materialised_model(tiny: dict[str, Path]) -> None:
    from tvedit.reader import load_tensors

    s = _session(tiny)
    ev = s.ev
    base_logits = ev.logits(s.task("a"), "test")
    assert torch.equal(s.predictions("a", "test", [0.0, 0.0]), base_logits.argmax(-1))
    # theta0 + 0.7 tau_a by substitution == a model built from the materialised weights
    tau, _ = load_tensors(tiny["tau_a"])
    theta, _ = load_tensors(tiny["base"])
    edited = {k: (v + 0.7 * tau[k]) if v.is_floating_point() else v for k, v in theta.items()}
    model = ev.adapter.build(edited)
    x, _ = s.task("a").split("test")
    with torch.no_grad():
        direct = ev.adapter.scores(model, x, ev.head(s.task("a")))
    sub = ev.logits(s.task("a"), "test", ev.edited([s.vectors[0].tensors], [0.7]))
    torch.testing.assert_close(sub, direct, rtol=1e-4, atol=1e-4)


def test_affine_flin_sweep_equals_per_alpha_jvp(tiny: dict[str, Path]) -> None:
    """normalise(g0 + alpha J tau) @ head (features computed once) == the shared f_lin helper
    applied to the encoder afresh at each alpha, normalised afterwards (the training definition)."""
    from tvedit.models.base import linearized

    s = _session(tiny, linearize=True)
    ev = s.ev
    task = s.task("b")
    x, _ = task.split("test")
    head = ev.head(task)
    tau = s.vectors[1].tensors
    keys = sorted(tau)
    theta0 = {k: ev.params[k] for k in keys}
    terms = s.terms("b", "test", [1])
    for alpha in (-1.5, 0.0, 0.4, 2.0):
        theta = {k: theta0[k] + alpha * tau[k] for k in keys}
        with torch.no_grad():
            feats = linearized(ev.model, theta0, theta, lambda m: m.encode_image(x))
            naive = (feats / feats.norm(dim=-1, keepdim=True)) @ head.T
        torch.testing.assert_close(terms.logits([alpha]), naive, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(terms.features([alpha]), feats, rtol=1e-4, atol=1e-4)


def test_vectors_linearized_under_another_flin_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A linearized vector whose fine-tuning recorded no ``flin`` (the old definition, linearizing
    the normalised scores) is refused (exit 4, one line); --allow-mismatch regime evaluates it with a warning;
    one recording this tvedit's definition is accepted."""
    from tvedit.errors import MismatchError
    from tvedit.evaluate import open_session
    from tvedit.reader import load_tensors

    paths = {}
    for tag, extra in (("old", {}), ("new", {"flin": "features"})):
        for t in ("a", "b"):
            state, m = load_tensors(tiny[f"tau_{t}"])
            m = Manifest.from_dict({**m.to_dict(), "regime": "linearized"}).with_step("finetune", {"mode": "linearized", **extra}, [])
            paths[tag, t] = tmp_path / f"{tag}_{t}.safetensors"
            save_tensors(paths[tag, t], state, m)
    tasks = {t: tiny[t] for t in ("a", "b")}
    with pytest.raises(MismatchError, match="old_a.safetensors.*linearizing the scores.*features") as exc:
        open_session([paths["old", "a"], paths["old", "b"]], tasks, tiny["base"])
    assert "\n" not in str(exc.value) and exc.value.exit_code == 4
    assert open_session([paths["old", "a"], paths["old", "b"]], tasks, tiny["base"], allow_flin_mismatch=True).linear
    assert open_session([paths["new", "a"], paths["new", "b"]], tasks, tiny["base"]).linear


def test_flin_first_order_agrees_with_nonlinear_for_small_alpha(tiny: dict[str, Path]) -> None:
    s_lin, s_non = _session(tiny, linearize=True), _session(tiny)
    a = 1e-3
    lin = s_lin.terms("a", "test", [0]).logits([a])
    non = s_non.ev.logits(s_non.task("a"), "test", s_non.ev.edited([s_non.vectors[0].tensors], [a]))
    torch.testing.assert_close(lin, non, rtol=1e-3, atol=1e-4)


def test_disentanglement_zero_on_axes(tiny: dict[str, Path]) -> None:
    from tvedit.evaluate import protocols as P
    from tvedit.evaluate import studies

    for linearize in (False, True):
        s = _session(tiny, linearize=linearize)
        grid = P.square_grid(-2, 2, 3)  # contains 0
        out = studies.disentanglement(s, grid, points=8)
        xi = torch.tensor(out["xi"])
        zero = grid.index(0.0)
        assert xi.shape == (3, 3)
        assert float(xi[zero, zero]) == 0.0
        # alpha2 = 0: task 1 compares identical models; task 2's joint model is theta0 + alpha1 tau1
        # against theta0, so only xi's task-2 term can be non-zero there; both are 0 at the origin.
        assert float(xi.min()) >= 0.0 and float(xi.max()) <= 2.0


def test_addition_and_negation_protocols_run(tiny: dict[str, Path]) -> None:
    from tvedit.evaluate import protocols as P
    from tvedit.evaluate import studies

    s = _session(tiny)
    grid = P.alpha_grid(0, 1, 0.25)
    rep = studies.addition(s, grid)
    assert rep["alpha"] in grid
    val = {a: {t: s.shared(t, "val", a) for t in ("a", "b")} for a in grid}
    single = {t: s.accuracy(t, "val", [1.0], [i]) for i, t in enumerate(("a", "b"))}
    assert rep["alpha"] == P.choose_addition_alpha(val, single).alpha
    assert rep["merged"]["a"] == pytest.approx(s.shared("a", "test", rep["alpha"]))

    s1 = _session(tiny, which=("a",))
    from tvedit.evaluate.data import load_task

    s1.tasks["b"] = load_task(s1.ev.adapter, "b", tiny["b"])
    neg = studies.negation(s1, "b", grid, threshold=0.95)
    row = neg["targets"][0]
    assert row["target"] == "a"
    assert row["control_val"] >= 0.95 * neg["control_zero_shot_val"] or not row["feasible"]


def test_cli_evaluate_json_lines_report_and_gate(
    tiny: dict[str, Path], cli, tmp_path: Path
) -> None:
    args = [
        "evaluate",
        str(tiny["tau_a"]),
        "--base",
        str(tiny["base"]),
        "--task",
        f"a={tiny['a']}",
        "--alpha",
        "0",
        "--alpha",
        "1",
    ]
    proc = cli(*args, "--report", str(tmp_path / "r.json"), "--min-accuracy", "a=0", "--device", "cpu", check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["task"], r["alpha"]) for r in rows] == [("a", 0.0), ("a", 1.0)]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"] == rows
    assert report["bf16"] is False  # the CPU never autocasts
    off = cli(*args, "--no-bf16", "--report", str(tmp_path / "r2.json"), "--device", "cpu", check=True)
    assert [json.loads(line) for line in off.stdout.splitlines()] == rows  # float32 either way on the CPU
    gate = tmp_path / "gate.yaml"
    gate.write_text("a: 1.0\n")
    assert min(r["accuracy"] for r in rows) < 1.0  # a random tiny model is not perfect
    failed = cli(*args, "--gate", str(gate))
    assert failed.returncode == 7
    assert "task a: accuracy" in failed.stderr and "below the threshold 1.0000" in failed.stderr
    assert failed.stdout  # the results are printed before the gate fails


@pytest.mark.slow
def test_cli_checkpoint_alone_disentanglement_and_mask_plots(
    tiny: dict[str, Path], cli, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    proc = cli(
        "evaluate",
        str(tiny["base"]),
        "--task",
        f"a={tiny['a']}",
        "--min-accuracy",
        "a=0",
        check=True,
    )
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["task"] == "a" and 0 <= row["accuracy"] <= 1
    png = tmp_path / "xi.png"
    cli(
        "evaluate", str(tiny["tau_a"]), str(tiny["tau_b"]), "--base", str(tiny["base"]),
        "--task", f"a={tiny['a']}", "--task", f"b={tiny['b']}", "--protocol", "disentanglement",
        "--grid-size", "3", "--points", "6", "--linearize", "-o", str(png), "--report", str(tmp_path / "xi.json"),
        check=True,
    )  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    xi = json.loads((tmp_path / "xi.json").read_text())
    assert len(xi["xi"]) == 3 and xi["xi"][1][1] == 0.0
    fig = tmp_path / "mask.png"
    proc = cli(
        "evaluate",
        "--mask-plot",
        str(tiny["tau_a"]),
        "-o",
        str(fig),
        "--report",
        str(tmp_path / "m.json"),
        check=True,
    )
    assert fig.read_bytes()[:4] == b"\x89PNG"
    layers = json.loads((tmp_path / "m.json").read_text())["layers"]
    blocks = {(r["tower"], r["block"], r["kind"]) for r in layers}
    assert ("visual.transformer", 0, "attn.qkv") in blocks and (
        "visual.transformer",
        0,
        "mlp.in",
    ) in blocks


def test_heatmap_and_mask_figure_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tvedit.evaluate.plots import heatmap, mask_figure, mask_layer_stats

    png = heatmap([[0.0, 0.5], [0.25, 1.0]], [-1.0, 1.0], ["a", "b"], tmp_path / "xi.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    stats = mask_layer_stats([
        ("visual.transformer.resblocks.0.attn.in_proj_weight", torch.tensor([True, False, False, False])),
        ("visual.transformer.resblocks.1.mlp.c_fc.weight", torch.tensor([True, True])),
        ("visual.proj", torch.tensor([False, True])),
    ])  # fmt: skip
    assert [(r["block"], r["kind"], r["fraction"]) for r in stats] == [
        (-1, "other", 0.5),
        (0, "attn.qkv", 0.25),
        (1, "mlp.in", 1.0),
    ]
    assert mask_figure(stats, tmp_path / "mask.png").read_bytes()[:4] == b"\x89PNG"


def test_device_choice() -> None:
    from tvedit.errors import UsageError
    from tvedit.models.base import pick_device

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="expected auto, cpu, cuda"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            pick_device("cuda")


def test_validation_split_is_the_one_the_vector_held_out(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The val split is rebuilt from the vector's manifest (fraction, seed, cap) and checked against
    its heldout_sha256: never the defaults when the vector was trained with another split."""
    import hashlib

    from tvedit.data import load_image_data, split_indices
    from tvedit.errors import DataError
    from tvedit.evaluate.data import load_task
    from tvedit.evaluate.runner import open_base

    adapter, _, _ = open_base(tiny["base"])
    n = len(load_image_data(tiny["a"] / "train"))
    _, held = split_indices(n, 0.4, 7, 5000)
    assert held != split_indices(n)[1]
    rec = {"name": "a", "classes": CLASSES["a"], "templates": ["a photo of a {}."],
           "split": {"seed": 7, "heldout_fraction": 0.4, "heldout_max": 5000,
                     "heldout_sha256": hashlib.sha256(json.dumps(held).encode()).hexdigest()}}  # fmt: skip
    task = load_task(adapter, "a", tiny["a"], rec)
    data = load_image_data(tiny["a"] / "train")
    assert task.split("val")[1].tolist() == [data.labels[i] for i in held]
    assert len(task.split("val")[1]) == len(held) != len(split_indices(n)[1])
    bad = {**rec, "split": {**rec["split"], "heldout_sha256": "0" * 64}}
    with pytest.raises(DataError, match="heldout_sha256") as exc:
        load_task(adapter, "a", tiny["a"], bad)
    assert exc.value.exit_code == 8 and "\n" not in str(exc.value)


def test_unknown_task_names_fall_back_with_one_warning(capsys: pytest.CaptureFixture[str]) -> None:
    from tvedit.data import resolve_templates

    imagenet = resolve_templates("ImageNet")
    assert len(imagenet) == 80 and len(set(imagenet)) == 80 and all("{}" in t for t in imagenet)
    assert "a bad photo of a {}." in imagenet and "a tattoo of the {}." in imagenet
    assert capsys.readouterr().err == ""
    assert resolve_templates("zzz-unknown-task") == ["a photo of a {}."]
    assert resolve_templates("zzz-unknown-task") == ["a photo of a {}."]
    err = capsys.readouterr().err
    assert err.count("warning: task 'zzz-unknown-task' has no built-in prompt templates") == 1


def test_bf16_autocast_is_a_switch(tiny: dict[str, Path]) -> None:
    """open_session(bf16=...) reaches the Evaluator: autocast only when asked for and on CUDA."""
    from tvedit.evaluate import open_session

    on = open_session([tiny["tau_a"]], {"a": tiny["a"]}, tiny["base"], device="cpu")
    off = open_session([tiny["tau_a"]], {"a": tiny["a"]}, tiny["base"], device="cpu", bf16=False)
    assert on.ev.bf16 is True and off.ev.bf16 is False
    assert on.ev.autocast is False and off.ev.autocast is False  # CPU: float32 whatever the switch


def _stderr_on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run tvedit with stderr on a pseudo-terminal and stdout on a pipe: (exit code, stdout, what the terminal got)."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="120", TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "tvedit", *args], stdout=subprocess.PIPE, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    seen = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen.append(chunk)
    out = proc.stdout.read().decode() if proc.stdout else ""
    os.close(master)
    return proc.wait(), out, b"".join(seen).decode(errors="replace")


def test_cli_evaluate_progress_on_a_terminal_only(tiny: dict[str, Path], cli, tmp_path: Path) -> None:
    args = ["evaluate", str(tiny["tau_a"]), str(tiny["tau_b"]), "--base", str(tiny["base"]), "--task", f"a={tiny['a']}",
            "--task", f"b={tiny['b']}", "--protocol", "addition", "--grid", "0:1:0.5", "--batch-size", "4", "--device", "cpu", "--json"]  # fmt: skip
    code, out, terminal = _stderr_on_a_terminal(args, tmp_path)
    assert code == 0, terminal
    assert "evaluate (addition)" in terminal and "test" in terminal, terminal  # the bar and what it is doing
    piped = cli(*args, check=True)
    assert piped.stderr == ""  # not a terminal: no bar
    assert [json.loads(line) for line in piped.stdout.splitlines()] == [json.loads(line) for line in out.splitlines()]


def test_cli_evaluate_allow_mismatch_base(tiny: dict[str, Path], cli, tmp_path: Path) -> None:
    from tvedit.models.open_clip import OpenClipAdapter

    adapter = OpenClipAdapter("tiny", TINY)
    torch.manual_seed(5)
    other = tmp_path / "other.safetensors"
    save_tensors(other, adapter.state_dict(adapter.build()), Manifest(kind="checkpoint", model=adapter.model_info()))
    args = ["evaluate", str(tiny["tau_a"]), "--base", str(other), "--task", f"a={tiny['a']}", "--device", "cpu"]
    for extra in ((), ("--force",)):  # --force only overwrites the report
        proc = cli(*args, *extra)
        assert proc.returncode == 4 and "--allow-mismatch base" in proc.stderr, proc.stderr
    bad = cli(*args, "--allow-mismatch", "family")
    assert bad.returncode == 2 and "evaluate checks only base and regime" in bad.stderr
    cli(*args, "--allow-mismatch", "base", "--report", str(tmp_path / "r.json"), check=True)
    assert json.loads((tmp_path / "r.json").read_text())["allow_mismatch"] == ["base"]
