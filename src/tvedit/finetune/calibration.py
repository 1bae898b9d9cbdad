"""TaLoS mask calibration (ALGORITHMS.md section 3): R rounds of per-example diagonal Fisher with
labels sampled from the model's own predictive distribution; globally keep the LEAST sensitive
entries, density k^(r/R) in round r; pruned entries are soft-masked in later rounds' forwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tvedit.models.base import ModelAdapter, forward_ad_safe, functional

Progress = Callable[[int, int, str], None]


def round_densities(density: float, rounds: int) -> list[float]:
    """k^(r/R) for r = 1..R (0.562, 0.316, 0.178, 0.1 for k=0.1, R=4)."""
    return [density ** (r / rounds) for r in range(1, rounds + 1)]


def select_lowest(scores: Mapping[str, Tensor], alive: Mapping[str, Tensor], count: int) -> dict[str, Tensor]:
    """Keep the ``count`` lowest-score entries among the alive ones, with ONE threshold across all
    tensors. Ties at the threshold: the earlier entry wins (keys sorted, then row-major order)."""
    keys = sorted(scores)
    flat = torch.cat([torch.where(alive[k].reshape(-1), scores[k].reshape(-1).float(), torch.inf) for k in keys])
    n_alive = int(sum(int(alive[k].sum()) for k in keys))
    count = max(0, min(count, n_alive))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if count > 0:
        threshold = torch.kthvalue(flat, count).values
        keep = flat < threshold
        need = count - int(keep.sum())
        if need > 0:
            ties = (flat == threshold).nonzero().squeeze(1)[:need]
            keep[ties] = True
    out, start = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = keep[start : start + n].reshape(scores[k].shape)
        start += n
    return out


def per_example_fisher(
    adapter: ModelAdapter,
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    head: Any,
    generator: torch.Generator,
    *,
    variant: str = "sampled",
    chunk: int = 8,
) -> dict[str, Tensor]:
    """Sum over the batch of per-example squared gradients of log p(y_hat|x) (``sampled``) or of
    the raw logit z_y_hat (``logit``), y_hat ~ p(.|x) sampled from the model itself."""
    from torch.func import grad, vmap

    def fn(x: Tensor) -> Callable[[nn.Module], Tensor]:
        return lambda m: adapter.scores(m, x, head)

    with torch.no_grad():
        logits = functional(model, params, fn(inputs)).float()
        probs = torch.softmax(logits, dim=-1)
        y_hat = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
    onehot = torch.nn.functional.one_hot(y_hat, logits.shape[-1]).to(logits.dtype)

    def objective(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        z = functional(model, p, fn(x[None]))[0].float()
        out = torch.log_softmax(z, dim=-1) if variant == "sampled" else z
        return (out * y).sum()

    total = {k: torch.zeros_like(v) for k, v in params.items()}
    with forward_ad_safe():
        for s in range(0, inputs.shape[0], chunk):
            grads = vmap(grad(objective), in_dims=(None, 0, 0))(dict(params), inputs[s : s + chunk], onehot[s : s + chunk])
            for k, g in grads.items():
                total[k] += g.pow(2).sum(0)
    return total


def calibrate_mask(
    adapter: ModelAdapter,
    model: nn.Module,
    head: Any,
    batches: Iterator[Tensor],
    *,
    density: float = 0.1,
    rounds: int = 4,
    calib_batches: int = 40,
    soft_value: float = 0.01,
    variant: str = "sampled",
    seed: int = 0,
    chunk: int = 8,
    progress: Progress | None = None,
) -> dict[str, Tensor]:
    """The TaLoS mask over ``adapter.maskable_keys()`` (True = kept = trained). ``batches`` yields
    calibration inputs (on the model's device); calib_batches are spread evenly over the rounds."""
    keys = adapter.maskable_keys()
    named = dict(model.named_parameters())
    theta0 = {k: named[k].detach() for k in keys}
    total = sum(t.numel() for t in theta0.values())
    mask = {k: torch.ones(t.shape, dtype=torch.bool) for k, t in theta0.items()}
    generator = torch.Generator().manual_seed(seed)
    per_round = [calib_batches // rounds + (1 if r < calib_batches % rounds else 0) for r in range(rounds)]
    done = 0
    was_training = model.training
    model.eval()
    for r, d in enumerate(round_densities(density, rounds)):
        soft = {k: (torch.where(mask[k], 1.0, soft_value).to(theta0[k]) * theta0[k]) for k in keys}
        scores = {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in theta0.items()}
        for _ in range(max(1, per_round[r])):
            fisher = per_example_fisher(adapter, model, soft, next(batches), head, generator, variant=variant, chunk=chunk)
            for k in keys:
                scores[k] += fisher[k].float().cpu()
            done += 1
            if progress:
                progress(done, sum(max(1, n) for n in per_round), f"round {r + 1}/{rounds}")
        mask = select_lowest(scores, mask, round(d * total))
    model.train(was_training)
    return mask
