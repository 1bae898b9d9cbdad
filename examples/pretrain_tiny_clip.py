"""Pre-train a tiny open_clip model contrastively on captioned images: the demo's theta0.

    python examples/pretrain_tiny_clip.py DATA_DIR OUT.safetensors [--steps N] [--seed S] [--width W] [--random]

DATA_DIR holds ``pretrain.npz`` (``images`` uint8 [N, 32, 32, 3], ``captions``) and ``data.json``, as
written by ``demo_data.py``. The model is a 32-px ViT (patch 8, width 128, 6 layers) with a 3-layer
text tower; it trains with the symmetric InfoNCE loss (open_clip's ClipLoss), AdamW and a cosine
schedule and random shifts of up to 2 px (no flips: glyphs must not be mirrored).
``--width`` sets the ViT's width (default 128; head width 32, so width/32 heads; everything else
as above): 256 makes the scale sweep's wider theta0. ``--random`` skips training: the randomly initialised model, for the random-theta0 control (task
arithmetic collapses without pre-training; tangent-space paper, Table 3).

The output is a tvedit checkpoint (``--dtype bfloat16`` halves it: the shipped artifact), written by
tvedit's own writer: its manifest holds the model record (open_clip's config, image size,
normalisation: what every tvedit command reads, so it needs no ``tvedit init``) and a ``pretrain``
provenance step recording how it was made (script, command, seed, steps, batch, learning rate, torch
version, the data's hashes from data.json, the loss curve, seconds); ``tvedit info OUT --json`` shows
it. A long run can be split: ``--resume-every N`` writes OUT.resume.pt (model, optimizer,
schedule, sampler state and losses; read back with ``torch.load(weights_only=True)``) every N steps,
``--max-steps-this-run M`` stops after M steps (exit 3, nothing else written), and the same command
run again continues from the resume file: the result equals an uninterrupted run's. The token embedding stays at its random initialisation (fewer parameters to update on a CPU; the
text transformer above it learns).

The committed artifact (examples/theta0/) was made by:

    python examples/demo_data.py demo-out/cache/data
    python examples/pretrain_tiny_clip.py demo-out/cache/data examples/theta0/tiny_clip.safetensors \
        --steps 2500 --batch 128 --seed 0 --dtype bfloat16   # 28 min on 2 shared CPU cores

and the wider one (examples/theta0/tiny_clip_wide.safetensors, 20 MB: the scale sweep's width points) by:

    python examples/pretrain_tiny_clip.py demo-out/cache/data examples/theta0/tiny_clip_wide.safetensors \
        --width 256 --steps 2500 --batch 128 --seed 0 --dtype bfloat16 --resume-every 50   # 30 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "layers": 6,
        "width": 128,
        "head_width": 32,
        "patch_size": 8,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 128,
        "heads": 4,
        "layers": 3,
        "mlp_ratio": 2.0,
    },
}
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


def config(width: int = 128) -> dict:
    """TINY_CLIP with the ViT ``width`` wide (head width 32)."""
    return {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "width": width}}


def save_theta0(state: dict[str, torch.Tensor], meta: dict, output: Path, cfg: dict = TINY_CLIP):
    """Write ``state`` as a tvedit checkpoint whose manifest records the model ``cfg`` and ``meta`` (a
    ``pretrain`` provenance step). The architecture is named after the file (``tiny_clip``)."""
    from tvedit.manifest import Manifest
    from tvedit.models.open_clip import OpenClipAdapter
    from tvedit.writer import save_tensors

    model = OpenClipAdapter(Path(output).stem, cfg).model_info()
    manifest = Manifest(kind="checkpoint", model=model).with_step("pretrain", meta, [])
    return save_tensors(output, state, manifest, force=True)


def build_model(config: dict) -> torch.nn.Module:
    import open_clip

    return open_clip.CLIP(**config)


def load_corpus(data_dir: Path, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images as one normalised float tensor [N, 3, 32, 32] and their tokenized captions."""
    import numpy as np
    import open_clip

    with np.load(data_dir / "pretrain.npz") as npz:
        images, captions = npz["images"], [str(c) for c in npz["captions"]]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return x, open_clip.tokenize(captions, context_length=context_length)


def pretrain(
    model: torch.nn.Module,
    x: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 1e-3,
    resume: Path | None = None,
    resume_every: int = 0,
    max_steps: int | None = None,
) -> tuple[list[float], float] | None:
    """Train; the per-step losses and the seconds spent (over every run of a resumed one), or None
    when ``max_steps`` stopped the run early (its state is in ``resume``). A ``resume`` file that
    exists is continued from."""
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(seed)
    loss_fn = ClipLoss()
    model.token_embedding.requires_grad_(
        False
    )  # random fixed token embeddings: 6.3M fewer parameters to update
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1
    )
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )
    losses: list[float] = []
    start, before, t0 = 0, 0.0, time.time()
    settings = {"steps": steps, "seed": seed, "batch": batch, "lr": lr}  # a resume file continues only its own run
    if resume is not None and resume.exists():
        state = torch.load(resume, weights_only=True)
        made = {k: state.get(k) for k in settings}
        shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
        if made != settings or shapes != {k: tuple(v.shape) for k, v in model.state_dict().items()}:
            given = " ".join(f"--{k} {v}" for k, v in made.items())
            raise SystemExit(f"{resume}: made by another run ({given}, or another --width); remove it to start again")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        g.set_state(state["sampler"])
        losses, start, before = list(state["losses"]), int(state["step"]), float(state["seconds"])
        print(f"  resuming at step {start} from {resume}", flush=True)

    def save(step: int) -> None:
        tmp = resume.with_name(resume.name + ".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                    "sampler": g.get_state(), "losses": losses, "step": step, **settings, "seconds": before + time.time() - t0}, tmp)  # fmt: skip
        os.replace(tmp, resume)

    model.train()
    for step in range(start, steps):
        if max_steps is not None and step - start >= max_steps:
            if resume is not None:
                save(step)
            model.eval()
            return None
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        # light augmentation: random shifts by up to 2 px
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        imgs = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
        img_f, txt_f, scale = model(imgs, tokens[idx])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", flush=True)
        if resume is not None and resume_every and (step + 1) % resume_every == 0 and step + 1 < steps:
            save(step + 1)
    model.eval()
    return losses, before + time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="storage dtype of the output")
    ap.add_argument("--width", type=int, default=128, help="the ViT's width (head width 32)")
    ap.add_argument("--resume-every", type=int, default=0, metavar="N", help="write OUT.resume.pt every N steps")
    ap.add_argument("--max-steps-this-run", type=int, default=None, metavar="M", help="stop after M steps (exit 3)")
    ap.add_argument("--random", action="store_true", help="no training: the random initialisation")
    args = ap.parse_args()
    if args.width <= 0 or args.width % 32:
        ap.error("--width: a positive multiple of 32 (the head width)")
    for name in ("steps", "batch", "resume_every", "max_steps_this_run"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name in ("steps", "batch", "max_steps_this_run"))):
            ap.error(f"--{name.replace('_', '-')}: {value} is not a positive number of {'steps' if name != 'batch' else 'examples'}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        ap.error(f"--lr: {args.lr} is not a positive finite learning rate")

    cfg = config(args.width)
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    resume = args.output.with_name(args.output.name + ".resume.pt")
    split = args.resume_every > 0 or args.max_steps_this_run is not None
    seconds = 0.0
    losses: list[float] = []
    data_info = None
    if not args.random:
        x, tokens = load_corpus(args.data_dir, cfg["text_cfg"]["context_length"])
        data_file = args.data_dir / "data.json"
        data_info = json.loads(data_file.read_text()) if data_file.exists() else None
        print(f"pre-training on {x.shape[0]} captioned images for {args.steps} steps", flush=True)
        done = pretrain(model, x, tokens, args.steps, args.seed, batch=args.batch, lr=args.lr,
                        resume=resume if split else None, resume_every=args.resume_every, max_steps=args.max_steps_this_run)  # fmt: skip
        if done is None:
            print(f"stopped after --max-steps-this-run {args.max_steps_this_run}; run the same command again to continue ({resume})")
            sys.exit(3)
        losses, seconds = done
    dtype = getattr(torch, args.dtype)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous() for k, v in model.state_dict().items()}
    every = 50
    meta = {
        "script": "examples/pretrain_tiny_clip.py",
        "command": "python examples/pretrain_tiny_clip.py DATA " + f"{args.output} --steps {args.steps} --batch {args.batch} --lr {args.lr:g} --seed {args.seed} --dtype {args.dtype}" + (f" --width {args.width}" if args.width != 128 else "") + (" --random" if args.random else ""),
        "seed": args.seed,
        "steps": 0 if args.random else args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "data": data_info,
        "loss_every": every,
        "loss": [round(sum(losses[i : i + every]) / len(losses[i : i + every]), 4) for i in range(0, len(losses), every)],
        "seconds": round(seconds, 1),
    }
    save_theta0(state, meta, args.output, cfg)
    resume.unlink(missing_ok=True)
    print(f"wrote {args.output} ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
