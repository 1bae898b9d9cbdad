"""init, calibrate, finetune: materialise theta0, calibrate a TaLoS mask, fine-tune a CLIP image encoder."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from tvedit.cli.common import (
    FINITE,
    FORCE_HELP,
    JSON_HELP,
    err_console,
    guard,
    json_mode,
    progress_bar,
    report,
)
from tvedit.safeio import check_output_parent

MODEL_HELP = "An open_clip model name (ViT-B-32) or a model-config JSON in open_clip's format (embed_dim, vision_cfg, text_cfg)."
PRETRAINED_HELP = "theta0: an open_clip tag (openai, laion2b_s34b_b79k; downloaded by open_clip), a local checkpoint (tvedit/plain safetensors or an open_clip .pt/.bin), or 'none' (random init, --seed)."
TRAIN_HELP = "Training data: an image folder (one sub-folder per class) or a .csv/.jsonl list of path,label; for seq2seq models (T5) a text task: a JSONL file, a task YAML or a directory of train/validation/test.jsonl (docs/text-models.md)."
TASK_HELP = "Task name (default: the data folder's name); picks CLIP's template set for mnist, svhn, eurosat, gtsrb, dtd, cars, sun397, resisc45."


def _config(config: Path | None, model: str | None = None, pretrained: str | None = None, **overrides: object):
    from tvedit.finetune.config import FinetuneConfig
    from tvedit.models.hf_seq2seq import RECIPE, is_text_model

    recipe = dict(RECIPE) if is_text_model(model, pretrained) else None  # the text recipe (docs/text-models.md)
    return FinetuneConfig.load(config, recipe, **overrides)


def register(app: typer.Typer) -> None:
    @app.command()
    @guard
    def init(
        model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Or a Hugging Face seq2seq directory (T5...: config.json, tokenizer, weights)."),
        pretrained: str | None = typer.Option(None, "--pretrained", "-p", help=PRETRAINED_HELP + " Required for open_clip."),
        output: Path = typer.Option(..., "--output", "-o", help="The theta0 checkpoint to write."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random init (--pretrained none)."),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Materialise theta0 as a tvedit checkpoint (model info in the manifest) so later artifacts record its hash."""
        check_output_parent(output)
        from tvedit.finetune import run

        report([run.init(model, pretrained, output, seed=seed, force=force)], json_mode(as_json))

    @app.command()
    @guard
    def calibrate(
        model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
        pretrained: str = typer.Option(..., "--pretrained", "-p", help=PRETRAINED_HELP),
        train: Path = typer.Option(..., "--train", help=TRAIN_HELP + " Calibration uses its held-out split."),
        output: Path = typer.Option(..., "--output", "-o", help="The mask (kind mask) to write."),
        config: Path | None = typer.Option(None, "--config", help="YAML/JSON file of options (flags override it)."),
        task: str | None = typer.Option(None, "--task", help=TASK_HELP),
        class_names: Path | None = typer.Option(None, "--class-names", help="YAML/JSON mapping folder/label -> readable class name."),
        templates: Path | None = typer.Option(None, "--templates", help="Prompt templates: a JSON list or one per line, each with {}."),
        density: float | None = typer.Option(None, "--density", help="Fraction of maskable entries KEPT (default 0.1).", parser=FINITE),
        rounds: int | None = typer.Option(None, "--rounds", help="Calibration rounds R (default 4)."),
        calib_batches: int | None = typer.Option(None, "--calib-batches", help="Calibration batches over all rounds (default 40)."),
        calib_batch_size: int | None = typer.Option(None, "--calib-batch-size", help="Examples per calibration batch (default: --batch-size)."),
        batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size (default 128)."),
        soft_value: float | None = typer.Option(None, "--soft-value", help="Multiplier of pruned entries in later rounds (paper 0.01; authors' code 0.1).", parser=FINITE),
        fisher: str | None = typer.Option(None, "--fisher", help="sampled: log p(y_hat|x) (paper, default); logit: raw logit z_y_hat (authors' code)."),
        seed: int | None = typer.Option(None, "--seed", help="Seed (label sampling, augmentation)."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Calibrate a TaLoS mask (least-sensitive entries, per-example Fisher) reusable across tasks."""
        check_output_parent(output)
        from tvedit.finetune import run

        cfg = _config(config, model, pretrained, density=density, rounds=rounds, calib_batches=calib_batches, calib_batch_size=calib_batch_size,
                      batch_size=batch_size, soft_value=soft_value, fisher=fisher, seed=seed, device=device, mode="sparse")  # fmt: skip
        with progress_bar("calibrate") as bar:
            arts = run.calibrate(model, pretrained, train, output, cfg, task=task, class_names=class_names, templates=templates, force=force, progress=bar)
        report(arts, json_mode(as_json))

    @app.command()
    @guard
    def finetune(
        model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Optional when --pretrained is a tvedit checkpoint."),
        pretrained: str = typer.Option(..., "--pretrained", "-p", help=PRETRAINED_HELP),
        train: Path = typer.Option(..., "--train", help=TRAIN_HELP),
        mode: str | None = typer.Option(None, "--mode", help="full | attn | linearized | sparse (default full)."),
        output: Path = typer.Option(..., "--output", "-o", help="The fine-tuned checkpoint (or task vector with --emit vector)."),
        config: Path | None = typer.Option(None, "--config", help="YAML/JSON file of options (flags override it)."),
        emit: str = typer.Option("checkpoint", "--emit", help="checkpoint (theta*) or vector (tau = theta* - theta0)."),
        task: str | None = typer.Option(None, "--task", help=TASK_HELP),
        class_names: Path | None = typer.Option(None, "--class-names", help="YAML/JSON mapping folder/label -> readable class name."),
        templates: Path | None = typer.Option(None, "--templates", help="Prompt templates: a JSON list or one per line, each with {}."),
        mask: Path | None = typer.Option(None, "--mask", help="sparse: reuse this mask (from tvedit calibrate) instead of calibrating."),
        lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default 1e-5; sparse on tiny models needs 10-20x more).", parser=FINITE),
        weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0.1).", parser=FINITE),
        batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (default 128)."),
        micro_batch: int | None = typer.Option(None, "--micro-batch", help="Per-device forward batch (gradient accumulation)."),
        steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (default 2000)."),
        warmup: int | None = typer.Option(None, "--warmup", help="Linear warm-up steps (default 200; the papers' code: 500)."),
        schedule: str | None = typer.Option(None, "--schedule", help="cosine (default: decay to 0 at the last step) or constant (after the warm-up)."),
        grad_clip: float | None = typer.Option(None, "--grad-clip", help="Gradient-norm clip (default 1.0; 0 = off).", parser=FINITE),
        clip_scope: str | None = typer.Option(None, "--clip-scope", help="sparse: clip by the norm of the full gradient (default, the TaLoS authors' code) or of the kept entries (kept: cheaper)."),
        label_smoothing: float | None = typer.Option(None, "--label-smoothing", help="Default 0.", parser=FINITE),
        seed: int | None = typer.Option(None, "--seed", help="Seed (data order, augmentation, random init, mask calibration)."),
        attn_bias: bool = typer.Option(False, "--attn-bias", help="attn mode: also train the attention projection biases."),
        train_embeddings: bool = typer.Option(False, "--train-embeddings", help="hf-causal: also train the embeddings and the LM head (frozen by default in every regime)."),
        density: float | None = typer.Option(None, "--density", help="sparse: fraction KEPT (default 0.1).", parser=FINITE),
        rounds: int | None = typer.Option(None, "--rounds", help="sparse: calibration rounds (default 4)."),
        calib_batches: int | None = typer.Option(None, "--calib-batches", help="sparse: calibration batches (default 40)."),
        soft_value: float | None = typer.Option(None, "--soft-value", help="sparse: soft-mask value (default 0.01).", parser=FINITE),
        fisher: str | None = typer.Option(None, "--fisher", help="sparse: sampled (default) or logit."),
        num_workers: int | None = typer.Option(None, "--num-workers", help="Data-loading worker processes (default 0)."),
        grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute activations in backward (less memory)."),
        checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Save resume state every N steps (OUT.resume/)."),
        stop_after: int | None = typer.Option(None, "--stop-after", help="Stop after N steps in this run, keeping resume state."),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUT.resume/ (same final weights as an uninterrupted run)."),
        eval_every: int | None = typer.Option(None, "--eval-every", help="Validate (mean held-out loss) every N steps and keep the best weights (default 0 = off; T5 recipe: 100)."),
        patience: int | None = typer.Option(None, "--patience", help="Stop after N validations without improvement (default 0 = off; T5 recipe: 5)."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N (torchrun: one process per GPU)."),
        sharding: str | None = typer.Option(None, "--sharding", help="Under torchrun: ddp (default: every process holds the model) or fsdp (fully_shard: each holds 1/N of the weights, gradients and optimizer state; not linearized)."),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Fine-tune a CLIP image encoder behind a frozen zero-shot head, or a seq2seq model (T5) on a text task: full, attn, linearized or sparse (TaLoS)."""
        check_output_parent(output)
        from tvedit.finetune import run

        cfg = _config(
            config, model, pretrained, mode=mode, lr=lr, weight_decay=weight_decay, batch_size=batch_size, micro_batch=micro_batch, steps=steps,
            warmup=warmup, schedule=schedule, grad_clip=grad_clip, clip_scope=clip_scope, label_smoothing=label_smoothing, seed=seed, attn_bias=attn_bias or None, train_embeddings=train_embeddings or None,
            density=density, rounds=rounds, calib_batches=calib_batches, soft_value=soft_value, fisher=fisher,
            num_workers=num_workers, grad_checkpointing=grad_checkpointing or None, checkpoint_every=checkpoint_every,
            stop_after=stop_after, device=device, sharding=sharding, eval_every=eval_every, patience=patience,
        )  # fmt: skip
        with progress_bar(f"finetune ({cfg.mode})") as bar:
            arts = run.finetune(model, pretrained, train, output, cfg, task=task, class_names=class_names, templates=templates,
                                mask=mask, emit=emit, resume=resume, force=force, progress=bar, calib_progress=bar)  # fmt: skip
        if (not arts or arts[0].path != output) and os.environ.get("RANK", "0") == "0":
            err_console.print(f"stopped before the last step; continue with --resume (state in {run.sibling(output, 'resume')})")
        if arts:
            report(arts, json_mode(as_json))
