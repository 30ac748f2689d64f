"""Model checkpoints that the other commands start from: parameters, model config, controls, data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, bad_value
from ..models import ModelConfig, RepresentationModel, build_model
from ..thermo.objective import Controls
from .rundir import atomic_save

__all__ = ["save_checkpoint", "load_checkpoint", "Checkpoint"]

FORMAT = "quasistatic-checkpoint-1"


class Checkpoint(dict):
    """The loaded dictionary: model_config, state_dict, controls, data, and run-specific extras."""

    def model(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> RepresentationModel:
        model = build_model(ModelConfig(**self["model_config"])).to(device=device, dtype=dtype)
        model.load_state_dict(self["state_dict"])  # cast into dtype: a float64 checkpoint keeps its digits in float64
        return model

    @property
    def controls(self) -> Controls:
        return Controls(**self["controls"])


def save_checkpoint(
    path: Path, model: RepresentationModel, controls: Controls, data: dict[str, Any], **extra: Any
) -> None:
    """Write atomically: the model's config and parameters, the controls, the data description."""
    atomic_save(
        {
            "format": FORMAT,
            "model_config": model.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "controls": controls.to_dict(),
            "data": data,
            **extra,
        },
        path,
    )


def load_checkpoint(path: str | Path, expect: ModelConfig | None = None) -> Checkpoint:
    """Read a checkpoint; with ``expect``, its model must have that architecture and shapes."""
    path = Path(path)
    if not path.is_file():
        raise bad_value("checkpoint", "an existing file", str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several unrelated types for a corrupt file
        raise InputError(
            f"checkpoint must be a quasistatic checkpoint, got unreadable {str(path)!r} ({error})"
        ) from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad_value(
            "checkpoint format", FORMAT, data.get("format") if isinstance(data, dict) else type(data).__name__
        )
    if expect is not None:
        saved = ModelConfig(**data["model_config"]).to_dict()
        for key, value in expect.to_dict().items():
            if saved[key] != value:
                raise InputError(f"checkpoint model {key} must be {value!r} (as requested), got {saved[key]!r}")
    return Checkpoint(data)
