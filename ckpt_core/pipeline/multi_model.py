"""Several models in one conversion (BAGEL-style main + EMA), inside the one pipeline.

A multi-model reader (one with `models()`) names tensors `<model>/<name>`. Two pieces here:
- `select_models`, a source transform: keeps the models `--models` asks for and lays each
  tensor out as the base's own weight files store it (the NaViT patch embedding Linear <->
  Conv2d, families.bagel); an ordinary source passes through (`--models ema` is refused).
- `plan_models`, used by the planner: checks every model against the base's weight-file
  headers (a BAGEL base names no transformers architecture: its files are the model), and
  maps each model to its own files and index (`model*.safetensors`, `ema*.safetensors`) plus
  the base's VAE. Writing, verification, manifest and publish are the pipeline's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import torch

from ckpt_core.dtypes import output_dtype, parse_target
from ckpt_core.errors import KeyMismatchError, UsageError, clip
from ckpt_core.families.bagel import (
    COPIED_WEIGHTS,
    OUTPUTS,
    conv_to_linear,
    has_qk_norm,
    linear_to_conv,
    model_name,
    patch_reshape,
    split_model_name,
)
from ckpt_core.formats.hf import read_weight_map
from ckpt_core.formats.protocol import Reader, SourceFacts, TensorInfo, lookup
from ckpt_core.formats.safetensors_header import read_header
from ckpt_core.io.storage import Location
from ckpt_core.pipeline.assets import AssetSource, check_asset
from ckpt_core.pipeline.modelcheck import ModelCheck
from ckpt_core.pipeline.plan import ShardSpec, plan_shards

if TYPE_CHECKING:
    from ckpt_core.pipeline.source import Source

__all__ = ["BaseWeights", "ModelsPlan", "base_weights", "models_of", "plan_models", "select_models"]

NO_BASE = "keys not checked: no base model weights (pass --base with model/ema.safetensors)"


def models_of(reader: Reader) -> tuple[str, ...] | None:
    """The models a multi-model reader holds; None for an ordinary (one-model) source."""
    models = getattr(reader, "models", None)
    return tuple(models()) if callable(models) else None


@dataclass(frozen=True)
class BaseWeights:
    """One base weight file's header listing: what the model it describes holds."""

    file: str  # e.g. "ema.safetensors" or "ema.safetensors.index.json"
    tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def base_weights(base: str | None, model: str) -> BaseWeights | None:
    """The base's listing for `model` (its own file first, then the other model's: one
    architecture); None without a base or without weight files in it."""
    if not base:
        return None
    root = Location(base)
    for stem in OUTPUTS[model].truth:
        single, index = f"{stem}.safetensors", f"{stem}.safetensors.index.json"
        if root.exists(index):
            files = sorted(set(read_weight_map(root, index).values()))
            found = index
        elif root.exists(single):
            files, found = [single], single
        else:
            continue
        tensors = {}
        for file in files:
            for name, entry in read_header(root, file).entries.items():
                tensors[name] = (entry.dtype, tuple(entry.shape))
        return BaseWeights(found, tensors)
    return None


# -- the source transform ------------------------------------------------------------------
def select_models(reader: Reader, source: Source) -> Reader:
    """A `TRANSFORMS` entry: the models `--models` asks for, each tensor in the base's form."""
    held = models_of(reader)
    asked = source.options.models
    if held is None:
        if asked == "ema":
            raise UsageError(
                f"{reader.root.url}: --models ema: this {source.format} checkpoint holds one "
                "model and no EMA weights; use --models main (or leave --models out)"
            )
        return reader
    chosen = held if asked == "both" else (asked,)
    if asked not in ("both", *held):
        raise UsageError(
            f"{reader.root.url}: --models {asked}: this checkpoint holds no {asked} weights "
            f"(found: {', '.join(held)}); its metadata.json says which models were saved"
        )
    return ModelsReader(reader, chosen, _reshapes(reader, chosen, source.options.base))


def _reshapes(
    reader: Reader, models: Sequence[str], base: str | None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (family rule, shape in the output) where the base stores a tensor in the other
    form than the checkpoint."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    index = reader.index()
    for model in models:
        truth = base_weights(base, model)
        if truth is None:
            continue
        for full, info in index.items():
            owner, name = split_model_name(full)
            if owner != model or name not in truth.tensors:
                continue
            base_shape = truth.tensors[name][1]
            rule = patch_reshape(name, tuple(info.shape), base_shape)
            if rule is not None:
                found[full] = (rule, base_shape)
    return found


class ModelsReader:
    """The chosen models of a multi-model reader, with the family's reshapes applied."""

    def __init__(
        self,
        inner: Reader,
        models: Sequence[str],
        reshapes: Mapping[str, tuple[str, tuple[int, ...]]],
    ) -> None:
        self.root: Location = inner.root
        self._inner = inner
        self._models = tuple(models)
        self._reshapes = dict(reshapes)
        self._index = {
            name: TensorInfo(name, info.dtype, self._reshapes.get(name, ("", info.shape))[1])
            for name, info in inner.index().items()
            if split_model_name(name)[0] in self._models
        }

    def models(self) -> tuple[str, ...]:
        return self._models

    def index(self) -> Mapping[str, TensorInfo]:
        return self._index

    def read(self, name: str) -> torch.Tensor:
        lookup(self._index, name, self.root.url)
        tensor = self._inner.read(name)
        rule = self._reshapes.get(name)
        if rule is None:
            return tensor
        return linear_to_conv(tensor, rule[1]) if rule[0] == "to_conv" else conv_to_linear(tensor)

    def read_range(
        self, name: str, start: int, count: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        lookup(self._index, name, self.root.url)
        read_range = getattr(self._inner, "read_range", None)
        if name in self._reshapes or read_range is None:  # a reshaped patch embedding is small
            flat = self.read(name).reshape(-1)[start : start + count]
            return flat if out is None else out.copy_(flat)
        result: torch.Tensor = read_range(name, start, count, out)
        return result

    def facts(self) -> SourceFacts:
        inner = self._inner.facts()
        notes = [*inner.notes, f"models converted: {', '.join(self._models)}"]
        for name, (rule, shape) in sorted(self._reshapes.items()):
            form = "Conv2d" if rule == "to_conv" else "Linear"
            notes.append(f"{name}: stored as the base stores it ({form} {list(shape)})")
        return SourceFacts(inner.format, list(inner.files), notes)

    def asset_dirs(self) -> list[Location]:
        return self._inner.asset_dirs()


# -- the plan --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelsPlan:
    models: tuple[str, ...]
    check: ModelCheck
    assets: tuple[AssetSource, ...]
    notes: tuple[str, ...]

    def shards(
        self, names: Sequence[str], size_of: Callable[[str], int], max_shard_bytes: int
    ) -> list[ShardSpec]:
        """Each model's tensors planned into its own files, under their names in the model."""
        shards: list[ShardSpec] = []
        for model in self.models:
            prefix, out = model_name(model, ""), OUTPUTS[model]
            own = [n[len(prefix) :] for n in names if n.startswith(prefix)]

            def sized(name: str, prefix: str = prefix) -> int:
                return size_of(prefix + name)

            planned = plan_shards(own, sized, max_shard_bytes, out.pattern)
            shards += [replace(s, source_prefix=prefix, index_name=out.index) for s in planned]
        return shards


def plan_models(reader: Reader, source: Source, *, where: str) -> ModelsPlan | None:
    """None for an ordinary source; else every chosen model checked against the base's own
    weight files (one line on any difference), its files, and the base's VAE among the assets."""
    models = models_of(reader)
    if models is None:
        return None
    base = source.options.base
    index = reader.index()
    target = parse_target(source.options.dtype)
    checked: dict[str, str] = {}  # model -> the base file it was checked against
    notes: list[str] = []
    for model in models:
        prefix = model_name(model, "")
        own = {n[len(prefix) :]: info for n, info in index.items() if n.startswith(prefix)}
        truth = base_weights(base, model)
        if truth is None:
            continue
        _check_against(own, truth, source, where=f"{where} ({model})", base=base or "")
        checked[model] = truth.file
        off = [
            n for n, info in own.items() if output_dtype(info.dtype, target) != truth.tensors[n][0]
        ]
        if off:
            notes.append(
                f"{model}: {len(off)} tensors are written in another dtype than the base's "
                f"{truth.file} stores them (--dtype {source.options.dtype}), e.g. {clip(off, 3)}"
            )
        notes.append(
            f"{model}: qk_norm {'present' if has_qk_norm(own) else 'absent'} (from the keys)"
        )
    keys = NO_BASE
    if checked:
        keys = "keys checked against the base's " + ", ".join(
            f"{file} ({model})" for model, file in checked.items()
        )
    assets = list(source.assets)
    if base:
        root = Location(base)
        for name in COPIED_WEIGHTS:
            if root.exists(name):
                check_asset(root, name)
                assets.append(AssetSource(name, root.url))
    return ModelsPlan(models, ModelCheck((), keys), tuple(assets), tuple(notes))


def _check_against(
    own: Mapping[str, TensorInfo], truth: BaseWeights, source: Source, *, where: str, base: str
) -> None:
    """The model's names and shapes are the base file's, exactly (allow-missing patterns aside)."""
    described = f"the model {Location(base).file(truth.file)} describes"
    mine, theirs = has_qk_norm(own), has_qk_norm(truth.tensors)
    if mine != theirs:
        raise KeyMismatchError(
            f"{where}: the checkpoint {'has' if mine else 'has no'} qk_norm weights "
            f"(self_attn.q_norm/k_norm) but {described} {'has' if theirs else 'has none'}; "
            "pass the base the checkpoint was trained from"
        )
    allow = source.options.open_options.allow_missing
    missing = [
        n for n in truth.tensors if n not in own and not any(fnmatchcase(n, p) for p in allow)
    ]
    unexpected = [n for n in own if n not in truth.tensors]
    if missing or unexpected:
        parts = [f"missing {len(missing)}: {clip(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)}: {clip(unexpected)}"] if unexpected else []
        raise KeyMismatchError(
            f"{where}: tensors do not match {described} ({'; '.join(parts)}); check --base"
        )
    shapes = [
        f"{n} {list(info.shape)} (base: {list(truth.tensors[n][1])})"
        for n, info in own.items()
        if tuple(info.shape) != truth.tensors[n][1]
    ]
    if shapes:
        raise KeyMismatchError(
            f"{where}: tensor shapes differ from {described}: {clip(shapes, 5)}; check --base: "
            "it describes another size of model than the one trained"
        )
