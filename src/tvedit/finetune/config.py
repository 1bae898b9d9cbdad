"""Fine-tuning hyper-parameters: the papers' recipe as defaults, overridable by YAML and flags."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tvedit.checks import finite_number
from tvedit.errors import UsageError
from tvedit.finetune.optim import SCHEDULES
from tvedit.finetune.sharding import SHARDINGS
from tvedit.models.base import MODES, pick_device

CLIP_SCOPES = ("full", "kept")  # sparse: clip norm over every maskable tensor's gradient (authors' code) | the kept entries only
FISHER_VARIANTS = ("sampled", "logit")  # log p(y_hat|x) with sampled y_hat (paper) | raw logit z_y_hat (authors' code)


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """A config value as its field's type: YAML reads ``1e-8`` as a string, and a file may hold anything."""
    kinds = [t.strip() for t in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    base = kinds[0]
    flag = "--" + name.replace("_", "-")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise UsageError(f"{flag}: expected true or false, not {value!r}")
    if base in ("int", "float"):
        if isinstance(value, bool):
            raise UsageError(f"{flag}: expected a number, not {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{flag}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise UsageError(f"{flag}: {value!r} is not a finite number")
        if base == "int":
            if number != int(number):
                raise UsageError(f"{flag}: {value!r} is not a whole number")
            return int(number)
        return number
    if not isinstance(value, str):
        raise UsageError(f"{flag}: expected a string, not {value!r}")
    return value


@dataclass
class FinetuneConfig:
    """Defaults: AdamW (wd 0.1), lr 1e-5, batch 128, cosine with 200 warm-up steps, 2,000 steps,
    grad clip 1.0, label smoothing 0 (ALGORITHMS.md section 2); TaLoS k=0.1, R=4, 40 calibration
    batches, soft value 0.01 (section 3)."""

    mode: str = "full"
    lr: float = 1e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 128  # global batch (constant across devices: gradient accumulation)
    micro_batch: int | None = None  # per-device forward batch; None = the whole per-device share
    steps: int = 2000
    warmup: int = 200
    schedule: str = "cosine"  # cosine (decay to 0 at steps) | constant (after the warm-up)
    grad_clip: float = 1.0
    clip_scope: str = "full"  # sparse only: the norm of the full gradient (authors' code) | of the kept entries
    label_smoothing: float = 0.0
    seed: int = 0
    attn_bias: bool = False
    train_embeddings: bool = False  # hf-causal: also train the token/position embeddings and the LM head
    # held-out split (validation / calibration)
    heldout_fraction: float = 0.1
    heldout_max: int = 5000
    split_seed: int = 0
    # TaLoS
    density: float = 0.1
    rounds: int = 4
    calib_batches: int = 40
    calib_batch_size: int | None = None  # None = batch_size
    calib_chunk: int = 8  # examples per vmap chunk of per-example gradients (memory)
    soft_value: float = 0.01
    fisher: str = "sampled"
    # execution
    num_workers: int = 0
    grad_checkpointing: bool = False
    checkpoint_every: int = 0
    stop_after: int | None = None  # stop after this many steps in this run (leaves resume state)
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sharding: str = "ddp"  # under torchrun: ddp (every rank holds the model) | fsdp (fully_shard: 1/N each)
    # validation on the held-out split (0 = never) and early stopping (0 = off)
    eval_every: int = 0
    patience: int = 0

    def validate(self) -> FinetuneConfig:
        for f in fields(self):  # a float from a flag or a --config file: finite (no NaN/Inf)
            if f.type == "float":
                setattr(self, f.name, finite_number(getattr(self, f.name), f"--{f.name.replace('_', '-')}"))
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        positive = {"lr": self.lr, "batch_size": self.batch_size, "steps": self.steps, "rounds": self.rounds, "calib_batches": self.calib_batches, "calib_chunk": self.calib_chunk}
        for name, value in positive.items():
            if not value > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, not {value}")
        if not 0 < self.density <= 1:
            raise UsageError(f"--density is the fraction KEPT and must be in (0, 1], not {self.density}")
        if not 0 <= self.soft_value < 1:
            raise UsageError(f"--soft-value must be in [0, 1), not {self.soft_value}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.clip_scope not in CLIP_SCOPES:
            raise UsageError(f"clip_scope must be one of {', '.join(CLIP_SCOPES)}, not {self.clip_scope!r}")
        if self.fisher not in FISHER_VARIANTS:
            raise UsageError(f"--fisher must be one of {', '.join(FISHER_VARIANTS)}, not {self.fisher!r}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.label_smoothing < 1:
            raise UsageError("--warmup, --weight-decay and --grad-clip must be >= 0, --label-smoothing in [0, 1)")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise UsageError("--micro-batch must be positive")
        if not 0 <= self.heldout_fraction < 1:
            raise UsageError("held-out fraction must be in [0, 1)")
        pick_device(self.device)  # a usage error now, not after the data is read
        if self.sharding not in SHARDINGS:
            raise UsageError(f"--sharding must be one of {', '.join(SHARDINGS)}, not {self.sharding!r}")
        if self.sharding == "fsdp" and self.mode == "linearized":
            raise UsageError("--sharding fsdp: the linearized regime trains through torch.func's jvp, which does not run over FSDP's sharded parameters; use --sharding ddp")
        if self.eval_every < 0 or self.patience < 0:
            raise UsageError("--eval-every and --patience must be >= 0")
        if self.patience and not self.eval_every:
            raise UsageError("--patience counts validations: it needs --eval-every N")
        if self.eval_every and not self.heldout_fraction:
            raise UsageError("--eval-every validates on the held-out split, which is empty (held-out fraction 0)")
        return self

    def params(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, path: Path | None = None, recipe: dict[str, Any] | None = None, **overrides: Any) -> FinetuneConfig:
        """Defaults <- the model family's recipe <- YAML/JSON file <- overrides that are not None."""
        values: dict[str, Any] = dict(recipe or {})
        if path is not None:
            import yaml

            try:
                data = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise UsageError(f"--config {path}: {exc}") from None
            if not isinstance(data, dict):
                raise UsageError(f"--config {path}: expected a mapping of option: value")
            values.update({k.replace("-", "_"): v for k, v in data.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown fine-tuning option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        types = {f.name: f.type for f in fields(cls)}
        values = {k: _coerce(k, v, str(types[k])) for k, v in values.items()}
        return cls(**values).validate()
