"""Each command-line flag declared once: on the frozen dataclass field it fills, with Megatron's
spelling, its argparse keywords and the field's resume class.

    lr: float = option("--lr", SCHEDULE, type=float, default=1e-3)

``add_group`` makes a config class's argparse group from its fields and ``read`` returns the
values its flags give directly. A field computed from flags (samples from --lr-warmup-iters or
--lr-warmup-samples) is ``derived`` and declares the flags it is computed from; the concern's
builder computes it. The resume policy (ckpt_policy) takes each field's class and flag names
from the same metadata, so a new field cannot be forgotten there (tests check every field has
one). Pure: no torch, imported by the trainer, the providers and the data alike.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Dict, Iterator, Tuple

# Resume classes: what may differ between a checkpoint's configuration and the run resuming it.
MATCH = "must match"  # the weights depend on it (shapes, layer kinds): a change is refused
LAYOUT = "layout"  # optimizer state reshards across DP only: must match when it is loaded
SCHEDULE = "schedule"  # Megatron's rule: a change needs --override- or --use-checkpoint-opt_param-scheduler
FREE = "may change"  # logged when it changes
QUIET = "run control"  # may change, not worth a log line (paths, logging, timeouts)
RESUME_CLASSES = (MATCH, LAYOUT, SCHEDULE, FREE, QUIET)


@dataclass(frozen=True)
class Flag:
    name: str  # Megatron's spelling
    aliases: Tuple[str, ...]
    kwargs: Tuple[Tuple[str, object], ...]  # argparse's keywords (a tuple: the field is frozen)

    @property
    def dest(self) -> str:
        return dict(self.kwargs).get("dest") or self.name[2:].replace("-", "_")

    def add_to(self, group) -> None:
        group.add_argument(self.name, *self.aliases, **dict(self.kwargs))


def arg(name: str, *aliases: str, **kwargs) -> Flag:
    """A flag that feeds a ``derived`` field."""
    return Flag(name, aliases, tuple(kwargs.items()))


def _flag_default(kwargs: dict):
    if kwargs.get("required"):
        return MISSING
    action = kwargs.get("action")
    if "default" not in kwargs and action in ("store_true", "store_false"):
        return action == "store_false"
    value = kwargs.get("default")
    return tuple(value) if isinstance(value, list) else value


_FLAGS_DEFAULT = object()


def option(name: str, resume: str, *aliases: str, value=_FLAGS_DEFAULT, **kwargs):
    """A field filled by one flag. Its dataclass default is the flag's unless ``value`` is given
    (``MISSING``: none, e.g. a size whose flag only overrides a preset)."""
    default = _flag_default(kwargs) if value is _FLAGS_DEFAULT else value
    meta = {"resume": resume, "flags": (arg(name, *aliases, **kwargs),), "direct": True}
    return field(default=default, metadata=meta)


def derived(resume: str, *flags: Flag, default=MISSING):
    """A field its concern's builder computes, from ``flags`` (declared here) or from other
    fields."""
    return field(default=default, metadata={"resume": resume, "flags": flags, "direct": False})


def add_group(parser: argparse.ArgumentParser, title: str, cls, description: str = None):
    group = parser.add_argument_group(title, description)
    for f in fields(cls):
        for fl in f.metadata.get("flags", ()):
            fl.add_to(group)
    return group


def read(cls, args: argparse.Namespace) -> dict:
    """{field: value} of ``cls``'s fields that one flag fills (lists as tuples)."""
    out = {}
    for f in fields(cls):
        if f.metadata.get("direct"):
            value = getattr(args, f.metadata["flags"][0].dest)
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def label(f: dataclasses.Field) -> str:
    """How a message names a field: its flags (``--lr-warmup-iters/--lr-warmup-samples``)."""
    return "/".join(fl.name for fl in f.metadata.get("flags", ())) or f.name


def walk(cfg, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field, object]]:
    """(dotted name, field, value) of every leaf of a config instance. A dataclass value without
    a resume class of its own (a concern of TrainConfig, a provider's config) is walked into."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value) and "resume" not in f.metadata:
            yield from walk(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def resume_classes(cfg) -> Dict[str, Tuple[str, str]]:
    """{dotted field: (resume class, label)}; a field without a class maps to None (a test fails
    on it)."""
    return {name: (f.metadata.get("resume"), label(f)) for name, f, _ in walk(cfg)}


def declarations(cls) -> Iterator[Tuple[str, Flag]]:
    """(qualified field, flag) of every flag declared on ``cls``."""
    for f in fields(cls):
        for fl in f.metadata.get("flags", ()):
            yield f"{cls.__name__}.{f.name}", fl
