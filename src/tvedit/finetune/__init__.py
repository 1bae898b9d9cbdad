"""Fine-tuning CLIP image encoders in four regimes (full, attn, linearized, sparse/TaLoS).

The loop is written once (loop.py); the regimes are small strategies (regimes.py); TaLoS mask
calibration is calibration.py; the library entry points are in run.py. See docs/finetune.md.
"""

from tvedit.finetune.config import FinetuneConfig

__all__ = ["FinetuneConfig", "calibrate", "finetune", "init"]


def __getattr__(name: str):  # lazy: importing tvedit.finetune stays cheap
    if name in ("calibrate", "finetune", "init"):
        from tvedit.finetune import run

        return getattr(run, name)
    raise AttributeError(name)
