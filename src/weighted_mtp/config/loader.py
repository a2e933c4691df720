"""Resolve a run's configuration from its layers and explain any mistake in one line.

Layers, later ones win: schema defaults < defaults.yaml < recipe < preset < --use-micro-model <
dotted command-line overrides. Each leaf remembers which layer set it, so an error names the file
(or the override) the bad value came from.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from weighted_mtp.config.schema import Config
from weighted_mtp.errors import ConfigError
from weighted_mtp.io import atomic_write_text

COMMAND_LINE = "command line"

# Names other training frameworks use for our keys; difflib alone would miss most of them.
KNOWN_ALIASES = {
    "learning_rate": "lr",
    "max_seq_length": "max_length",
    "seq_len": "max_length",
    "max_seq_len": "max_length",
    "gradient_accumulation_steps": "grad_accum_steps",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "max_grad_norm": "grad_clip",
    "clip_grad_norm": "grad_clip",
    "num_train_epochs": "epochs",
    "warmup": "warmup_steps",
    "n_heads": "n_future_tokens",
    "num_heads": "n_future_tokens",
}


@dataclass
class Layer:
    source: str
    data: dict[str, Any]


@dataclass
class ResolvedConfig:
    config: Config
    layers: list[Layer] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return [layer.source for layer in self.layers]


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`training.lr=1e-4` -> ("training.lr", 0.0001). Values are YAML, so lists and nulls work."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{COMMAND_LINE}: override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key, value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind a field annotation, unwrapping `X | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model = _section_model(arg)
            if model is not None:
                return model
    return None


def _check_keys(data: dict[str, Any], model: type[BaseModel], prefix: str, source: str) -> None:
    """Reject unknown keys with the closest valid one, before pydantic sees the data."""
    valid = list(model.model_fields)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in model.model_fields:
            candidates = [f"{prefix}{name}" for name in valid]
            alias = KNOWN_ALIASES.get(key)
            close = [f"{prefix}{alias}"] if alias in model.model_fields else []
            close = close or difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
            if not close:
                close = _closest_anywhere(dotted)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {dotted!r}{hint}")
        sub = _section_model(model.model_fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, f"{dotted}.", source)


def _all_dotted_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        keys.append(f"{prefix}{name}")
        sub = _section_model(info.annotation)
        if sub is not None:
            keys.extend(_all_dotted_keys(sub, f"{prefix}{name}."))
    return keys


def _closest_anywhere(dotted: str) -> list[str]:
    """A key put in the wrong section (`lr` at the top) still gets a useful suggestion."""
    keys = _all_dotted_keys()
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[:1]
    return difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _source_of(loc: tuple, layers: list[Layer]) -> str:
    """The last layer that set the field at `loc` (or any field under it)."""
    for layer in reversed(layers):
        node: Any = layer.data
        found = True
        for part in loc:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list | tuple) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                found = False
                break
        if found:
            return layer.source
    return "defaults"


def _format_validation_error(exc: ValidationError, layers: list[Layer]) -> str:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if p not in ("function-after",))
    dotted = ".".join(str(p) for p in loc if isinstance(p, str)) or "config"
    msg = err["msg"]
    source = _source_of(loc, layers)
    if err["type"].startswith("value_error"):
        msg = msg.removeprefix("Value error, ")
        return f"{source}: {msg}"
    got = err.get("input")
    got_text = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return f"{source}: {dotted}: {msg}{got_text}"


def available_names(directory: Path, pattern: str, strip: tuple[str, str]) -> list[str]:
    prefix, suffix = strip
    return sorted(p.name.removeprefix(prefix).removesuffix(suffix) for p in directory.glob(pattern))


def _closest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def resolve_recipe_path(recipe: str, config_dir: Path) -> Path:
    """A recipe is a path or a short name (`baseline` -> configs/recipe.baseline.yaml)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        return path
    candidate = config_dir / f"recipe.{recipe}.yaml"
    if candidate.is_file():
        return candidate
    names = available_names(config_dir, "recipe.*.yaml", ("recipe.", ".yaml"))
    raise ConfigError(f"unknown recipe {recipe!r}{_closest(recipe, names)} (available in {config_dir}: {', '.join(names) or 'none'})")


def resolve_preset_path(preset: str, config_dir: Path) -> Path:
    presets_dir = config_dir / "presets"
    candidate = presets_dir / f"{preset}.yaml"
    if candidate.is_file():
        return candidate
    names = available_names(presets_dir, "*.yaml", ("", ".yaml"))
    raise ConfigError(f"unknown preset {preset!r}{_closest(preset, names)} (available: {', '.join(names) or 'none'})")


def load_config(
    defaults: str | Path | None = "configs/defaults.yaml",
    recipe: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    use_micro_model: bool = False,
) -> ResolvedConfig:
    """Merge the layers, check every key, validate, and return the config with its provenance."""
    layers: list[Layer] = []
    config_dir = Path("configs")
    if defaults is not None:
        defaults_path = Path(defaults)
        layers.append(Layer(str(defaults_path), read_yaml(defaults_path)))
        config_dir = defaults_path.parent
    if recipe is not None:
        recipe_path = resolve_recipe_path(str(recipe), config_dir)
        layers.append(Layer(str(recipe_path), read_yaml(recipe_path)))
    if preset is not None:
        preset_path = resolve_preset_path(preset, config_dir)
        layers.append(Layer(str(preset_path), read_yaml(preset_path)))
    if use_micro_model:
        layers.append(Layer("--use-micro-model", {"model": {"name": "micro"}}))
    for text in overrides:
        key, value = parse_override(text)
        layers.append(Layer(f"{COMMAND_LINE} override {key}", _nest(key, value)))

    merged: dict[str, Any] = {}
    for layer in layers:
        _check_keys(layer.data, Config, "", layer.source)
        merged = deep_merge(merged, layer.data)
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, layers)) from None
    return ResolvedConfig(config=config, layers=layers)


def public_dump(config: Config) -> dict[str, Any]:
    """The config as plain data with credentials in URLs replaced by ***: what files, printouts and
    tracking parameters get (a password in tracking.uri reaches MLflow through its environment)."""
    from weighted_mtp.redact import redact_uri

    tree = config.model_dump(mode="json")
    tree["tracking"]["uri"] = redact_uri(tree["tracking"]["uri"])
    if tree["s3"]["endpoint_url"]:
        tree["s3"]["endpoint_url"] = redact_uri(tree["s3"]["endpoint_url"])
    return tree


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(public_dump(config), sort_keys=False, default_flow_style=None)


def annotated_yaml(resolved: ResolvedConfig) -> str:
    """The resolved config as YAML, each value set by a layer (not a schema default) followed by a
    comment naming that layer: the file, `--use-micro-model`, or the command-line override."""
    lines: list[str] = []

    def emit(node: dict[str, Any], path: tuple[str, ...], indent: str) -> None:
        for key, value in node.items():
            here = (*path, key)
            if isinstance(value, dict) and value:
                lines.append(f"{indent}{key}:")
                emit(value, here, indent + "  ")
                continue
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1]
            source = _source_of(here, resolved.layers)
            lines.append(f"{indent}{text}" + ("" if source == "defaults" else f"  # {source}"))

    emit(public_dump(resolved.config), (), "")
    return "\n".join(lines) + "\n"


def save_resolved_config(config: Config, directory: Path) -> Path:
    """Save the resolved config beside a run's outputs, so the run can be reproduced from it alone."""
    path = Path(directory) / "config.yaml"
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    atomic_write_text(path, config_to_yaml(config))
    return path


def load_saved_config(path: str | Path) -> Config:
    """Load a config saved by `save_resolved_config`; it is already resolved, so it is one layer."""
    path = Path(path)
    layer = Layer(str(path), read_yaml(path))
    _check_keys(layer.data, Config, "", layer.source)
    try:
        return Config.model_validate(layer.data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, [layer])) from None
