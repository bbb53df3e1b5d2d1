"""Strict, typed loading of `params.yaml`: one frozen dataclass per section.

An unknown key, a missing section, a wrong type or a value out of range raises `ParamsError`
naming the key and what is allowed, before any work. Numbers written as YAML 1.2 floats
(`1e-4`, which PyYAML reads as a string, as `dvc exp run -S` writes them) are accepted.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from .errors import PipelineError


class ParamsError(PipelineError):
    """A params.yaml value that cannot be used."""


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


def _choice(*choices: str) -> dict:
    return {"choices": choices}


# What MLflow accepts both as a registered model's name and as the name its model is logged
# under (no . / : % quotes), so that a bad name stops the stage before training, not after.
_NAME = {"pattern": r"[\w-]+", "what": "a name of letters, digits, _ and -"}


def name_problem(name: str) -> str | None:
    """Why MLflow would refuse `name` for a registered (and logged) model, or None."""
    return None if re.fullmatch(_NAME["pattern"], name) else f"expected {_NAME['what']}"


def alias_problem(alias: str) -> str | None:
    """Why MLflow would refuse `alias` as a registered model's alias, or None."""
    if not re.fullmatch(_NAME["pattern"], alias):
        return "expected letters, digits, _ and -"
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        return "'latest' and v<N> name versions in MLflow, not aliases"
    return None


@dataclass(frozen=True)
class TrainParams:
    """The `train` section: model, recipe, speed options and tracking names."""

    experiment_name: str = "mnist-cnn"
    registered_model: str = field(default="mnist-cnn", metadata=_NAME)
    seed: int = field(default=0, metadata=_num(0, 2**31 - 1))
    epochs: int = field(default=20, metadata=_num(1, 1000))
    batch_size: int = field(default=100, metadata=_num(2, 60000))
    lr: float = field(default=0.001, metadata=_num(0, 10, lo_open=True))
    optimizer: str = field(default="adam", metadata=_choice("adam", "adamw", "sgd"))
    weight_decay: float = field(default=0.0, metadata=_num(0, 1))
    # plateau: ReduceLROnPlateau once per epoch (the reference); onecycle / cosine: per batch
    scheduler: str = field(
        default="plateau", metadata=_choice("plateau", "onecycle", "cosine", "none"))
    # Which loss drives ReduceLROnPlateau: the reference steps it on the last batch's loss.
    plateau_loss: str = field(
        default="last_batch", metadata=_choice("last_batch", "epoch_mean", "val_loss"))
    plateau_factor: float = field(default=0.1, metadata=_num(0, 1, lo_open=True))
    plateau_threshold: float = field(default=0.1, metadata=_num(0, 1))
    plateau_patience: int = field(default=1, metadata=_num(0, 100))
    # the share of the steps that warm up (1 would leave none to anneal)
    onecycle_pct: float = field(default=0.25, metadata=_num(0, 1, lo_open=True, hi_open=True))
    # Use only the first N training images (0 = all); for smoke tests.
    train_subset: int = field(default=0, metadata=_num(0, 60000))
    # Beyond the reference (all off by default): a validation split carved from the training
    # set by seed, for the scheduler, early stopping and choosing the best epoch; the test
    # set is only ever used for the final report.
    val_size: int = field(default=0, metadata=_num(0, 30000))
    select_best: bool = False  # keep the epoch with the best validation accuracy
    # Stop once this many epochs in a row brought no lower val_loss than the best before
    # them (0 = never stop early).
    early_stop_patience: int = field(default=0, metadata=_num(0, 1000))
    label_smoothing: float = field(default=0.0, metadata=_num(0, 0.5))
    augment: bool = False  # random shifts, rotations and scaling on the training device
    augment_shift: float = field(default=2.0, metadata=_num(0, 8))  # pixels
    augment_rotate: float = field(default=10.0, metadata=_num(0, 45))  # degrees
    augment_scale: float = field(default=0.1, metadata=_num(0, 0.5))  # fraction
    ema_decay: float = field(default=0.0, metadata=_num(0, 0.99999))  # 0 = no weight EMA
    tta: bool = False  # average predictions over 1-pixel shifts (also in the served model)

    # Speed options. Those that change the arithmetic (bf16, compile) are off by default;
    # channels_last, fused_optimizer and fused_kernels keep fp32 and change only the order
    # of rounding (the same accuracy in distribution: README.md's accuracy table is measured
    # with them), so they are on. bench/RESULTS.md has what each one is worth.
    amp: str = field(default="none", metadata=_choice("none", "bf16"))
    channels_last: bool = True
    compile: bool = False
    fused_optimizer: bool = True
    # (conv+)BatchNorm+ReLU(+max-pool) in one compiled CPU kernel each way (mnist_pipeline.fused);
    # the eager modules where it cannot be built, on a GPU, with bf16, with compile or
    # without channels_last.
    fused_kernels: bool = True
    # small batches keep a CPU's activations in cache
    eval_batch_size: int = field(default=200, metadata=_num(1, 10000))
    cuda_deterministic: bool = True
    # Training processes per machine, launched with torchrun (data parallel: each takes
    # batch_size / world size images of every step). 1: one process, no torchrun.
    nproc: int = field(default=1, metadata=_num(1, 64))

    def __post_init__(self) -> None:
        if self.batch_size % self.nproc:
            raise ParamsError(f"params: train.batch_size: {self.batch_size} images per step "
                              f"do not divide evenly over train.nproc={self.nproc} processes")
        if self.compile and self.nproc > 1:
            raise ParamsError("params: train.compile: not supported with train.nproc > 1")
        needs_val = [k for k, on in (("select_best", self.select_best),
                                     ("plateau_loss", self.plateau_loss == "val_loss"),
                                     ("early_stop_patience", self.early_stop_patience > 0))
                     if on]
        if needs_val and self.val_size == 0:
            raise ParamsError(f"params: train.{needs_val[0]}: needs a validation split "
                              "(train.val_size > 0)")


@dataclass(frozen=True)
class EvaluateParams:
    """The `evaluate` section."""

    batch_size: int = field(default=200, metadata=_num(1, 10000))
    misclassified_max: int = field(default=100, metadata=_num(0, 10000))


@dataclass(frozen=True)
class PromoteParams:
    """The `promote` section, read by `mnist-pipeline promote`."""

    alias: str = "champion"
    min_accuracy: float = field(default=0.995, metadata=_num(0, 1))

    def __post_init__(self) -> None:
        problem = alias_problem(self.alias)
        if problem:
            raise ParamsError(f"params: promote.alias: {problem}, got {self.alias!r}")


SECTIONS: dict[str, type] = {
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "promote": PromoteParams,
}

T = TypeVar("T")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _describe(meta: dict, kind: str) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if "pattern" in meta:
        return meta["what"]
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return kind
    left = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
    right = f"< {hi}" if meta.get("hi_open") else f"<= {hi}"
    return f"{kind} {left} and {right}"


def _coerce(key: str, value: Any, kind: type, meta: dict) -> Any:
    """Return `value` as `kind`, or raise ParamsError naming `key`."""
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
    expected = _describe(meta, name)
    if kind is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params: {key}: expected true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ParamsError(f"params: {key}: expected {expected}, got {value!r}")
        if "choices" in meta and value not in meta["choices"]:
            raise ParamsError(f"params: {key}: expected {expected}, got {value!r}")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            raise ParamsError(f"params: {key}: expected {expected}, got {value!r}")
        return value
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamsError(f"params: {key}: expected {expected}, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ParamsError(f"params: {key}: expected {expected}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ParamsError(f"params: {key}: expected {expected}, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    too_low = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    too_high = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if too_low or too_high:
        raise ParamsError(f"params: {key}: expected {expected}, got {value!r}")
    return value


def parse_section(section: str, raw: Any, cls: type[T]) -> T:
    """Build the frozen dataclass `cls` from the mapping `raw`, strictly."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params: {section}: expected a mapping of keys, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - set(fields)))  # a key may be a number: 1: 2
    if unknown:
        raise ParamsError(
            f"params: {section}.{unknown[0]}: unknown key; allowed keys: {', '.join(fields)}"
        )
    values = {
        name: _coerce(f"{section}.{name}", raw[name], hints[name], dict(fields[name].metadata))
        for name in fields
        if name in raw
    }
    return cls(**values)


def coerce_value(section: str, key: str, value: Any) -> Any:
    """`value` of `section.key` as its params field holds it (e.g. '1e-3' -> 0.001, 3 -> 3.0
    for a number), or raise ParamsError."""
    cls = SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ParamsError(f"params: {section}.{key}: unknown key")
    return _coerce(f"{section}.{key}", value, get_type_hints(cls)[key],
                   dict(fields[key].metadata))


def load_params(path: str | Path, section: str) -> Any:
    """Load and validate one section of a params file (the whole file must parse)."""
    import yaml  # here, not at the top: the benchmark imports TrainParams without PyYAML

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"params: {path} not found") from None
    except OSError as exc:  # a folder, no permission
        raise ParamsError(f"params: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ParamsError(f"params: {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"params: {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ParamsError(f"params: {path} must be a mapping of sections")
    unknown = sorted(map(str, set(doc) - set(SECTIONS)))
    if unknown:
        raise ParamsError(
            f"params: {unknown[0]}: unknown section; allowed sections: {', '.join(SECTIONS)}"
        )
    if section not in doc:
        raise ParamsError(f"params: section {section!r} is missing from {path}")
    return parse_section(section, doc[section], SECTIONS[section])


def to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)
