"""Pre-train a tiny open_clip model contrastively on captioned images: the demo's theta0.

    python examples/pretrain_tiny_clip.py DATA_DIR OUT.safetensors [--steps N] [--seed S] [--random]

DATA_DIR holds ``pretrain.csv`` (``path,caption``, paths relative to DATA_DIR), as written by
``demo_data.py``. The model is a 32-px ViT (patch 8, width 128, 4 layers) with a 2-layer text
tower; it trains with the symmetric InfoNCE loss (open_clip's ClipLoss), AdamW and a cosine
schedule. ``--random`` skips training: the randomly initialised model, for the random-theta0 control
(task arithmetic collapses without pre-training; tangent-space paper, Table 3).

The output is a plain open_clip state dict plus its model config beside it (``OUT.json``, open_clip's
``model_cfg`` format): ``tvedit init --model OUT.json --pretrained OUT.safetensors`` turns it into
a tvedit checkpoint. The token embedding stays at its random initialisation (fewer parameters to
update on a CPU; the text transformer above it learns).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "layers": 4,
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
        "layers": 2,
        "mlp_ratio": 2.0,
    },
}
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


def build_model(config: dict) -> torch.nn.Module:
    import open_clip

    return open_clip.CLIP(**config)


def load_corpus(data_dir: Path, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images as one normalised float tensor [N, 3, 32, 32] and their tokenized captions."""
    import open_clip
    from PIL import Image

    rows = list(csv.DictReader(open(data_dir / "pretrain.csv")))
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    images = []
    for r in rows:
        img = Image.open(data_dir / r["path"]).convert("RGB")
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(
            img.height, img.width, 3
        )
        images.append(t.permute(2, 0, 1).float().div(255))
    x = (torch.stack(images) - mean) / std
    tokens = open_clip.tokenize([r["caption"] for r in rows], context_length=context_length)
    return x, tokens


def pretrain(
    model: torch.nn.Module,
    x: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 1e-3,
) -> list[float]:
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
    model.train()
    losses = []
    for step in range(steps):
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
    model.eval()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random", action="store_true", help="no training: the random initialisation")
    args = ap.parse_args()
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    model = build_model(TINY_CLIP)
    t0 = time.time()
    if not args.random:
        x, tokens = load_corpus(args.data_dir, TINY_CLIP["text_cfg"]["context_length"])
        print(f"pre-training on {x.shape[0]} captioned images for {args.steps} steps", flush=True)
        pretrain(model, x, tokens, args.steps, args.seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.output))
    meta = {
        "seed": args.seed,
        "steps": 0 if args.random else args.steps,
        "seconds": round(time.time() - t0, 1),
    }
    # open_clip's config format (what `tvedit init --model FILE.json` reads), plus how it was made
    args.output.with_suffix(".json").write_text(
        json.dumps({"model_cfg": TINY_CLIP, "pretrain": meta}, indent=2)
    )
    print(f"wrote {args.output} ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
