"""LeRobot policies behind robolora's policy protocol (docs/lerobot.md, docs/design.md §7).

``load_lerobot_policy(folder)`` reads a saved LeRobot policy folder (``config.json``, ``model.safetensors`` and the
processor files ``policy_preprocessor.json`` / ``policy_postprocessor.json`` with their normaliser state) and
returns a ``LeRobotPolicy``: an ``nn.Module`` following ``robolora.policy``'s protocol, so robolora's LoRA
injection, training loop, ``SkillManager``, export and controller take it like one of robolora's own policies.

Keys. robolora observations are the env's (``spec.observation``); each maps to one LeRobot input feature:

| LeRobot feature (config.json)           | robolora key   | robolora batch         | LeRobot batch                |
| --------------------------------------- | -------------- | ---------------------- | ---------------------------- |
| ``observation.images.<cam>`` (VISUAL)   | ``rgb_<cam>``  | uint8 (B, H, W, 3)     | float (B, 3, H, W) in [0, 1] |
| ``observation.state`` (STATE)           | ``proprio``    | float (B, P)           | float (B, P)                 |
| ``observation.environment_state`` (ENV) | ``env_state``  | float (B, E)           | float (B, E)                 |
| ``action`` (ACTION)                     | ``action``     | (B, K, A) in env units | (B, K, A) normalised         |

Normalisation is the folder's: the normaliser and unnormaliser steps of its processor pipelines (loaded with
LeRobot's own ``PolicyProcessorPipeline``) become buffers of a ``LeRobotNormalization`` module that applies
LeRobot's formulas (MEAN_STD, MIN_MAX, QUANTILES, QUANTILE10, IDENTITY) inside ``predict_chunk`` and ``forward``.
So actions come out in env units, the statistics travel in ``state_dict`` (and the base fingerprint), and an
exported graph holds the normalisation. Pipelines with any other step (relative actions, tokenizers) are refused.

Module names. The wrapper registers the LeRobot policy's own submodules under their own names (ACT: ``model``),
so LoRA target names and state-dict keys are LeRobot's: ``model.encoder.layers.0.self_attn.q`` ...
``model.decoder.layers.0.multihead_attn.out_proj`` and ``model.encoder.layers.0.linear1``, and a PEFT adapter
saved by ``lerobot-train --peft`` (keys ``base_model.model.model.encoder...``) loads with ``from_peft``.

Supported policy types: ACT (``"type": "act"``). LeRobot's ACT has no skill-conditioning hook, so skills train and
attach without a skill token.

lerobot (>= 0.6, Python >= 3.12) is imported only inside the functions that need it; everything else here (the
feature mapping, the normalisation module, the wrapper itself) runs without it.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from robolora.policy import ChunkedActing, Execution, PolicySpec, TensorSpec

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = ("act",)
INSTALL_HINT = ('pip install "robolora[lerobot]" in a Python >= 3.12 environment (lerobot >= 0.5 requires Python '
                '3.12; see docs/lerobot.md)')
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
PREPROCESSOR, POSTPROCESSOR = "policy_preprocessor", "policy_postprocessor"
IMAGE_PREFIX, STATE_KEY, ENV_STATE_KEY, ACTION_KEY = ("observation.images.", "observation.state",
                                                      "observation.environment_state", "action")
# Pipeline steps whose effect the wrapper reproduces: batching and device moves are its own, renames act on the
# keys a dataset or env hands LeRobot (the wrapper builds LeRobot's keys itself), (un)normalisation is buffers.
_PASSIVE_STEPS = {"rename_observations_processor", "to_batch_processor", "device_processor"}
_NORMALIZER, _UNNORMALIZER = "normalizer_processor", "unnormalizer_processor"
_RANGE_STATS = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


def require_lerobot() -> ModuleType:
    """The ``lerobot`` package, or an ImportError saying how to install it."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    message = f"robolora's LeRobot integration needs lerobot, which is not importable here (Python {python}): "
    try:
        module = importlib.import_module("lerobot")
    except ImportError as err:
        raise ImportError(message + INSTALL_HINT) from err
    if getattr(module, "__file__", None) is None:  # a folder named lerobot on sys.path (a namespace package)
        raise ImportError(message + f"'lerobot' resolves to the folder(s) {list(module.__path__)}; " + INSTALL_HINT)
    return module


# ---------------------------------------------------------------------------------------------- feature mapping


@dataclass(frozen=True)
class Feature:
    """One LeRobot input feature and the robolora observation key it is read from."""

    lerobot_key: str
    type: str  # LeRobot FeatureType name: VISUAL, STATE or ENV
    shape: tuple[int, ...]  # LeRobot's shape: (3, H, W) for images

    @property
    def key(self) -> str:
        """The robolora observation key (module docstring's table)."""
        if self.type == "VISUAL":
            return "rgb_" + self.lerobot_key.removeprefix(IMAGE_PREFIX).removeprefix("observation.")
        return {STATE_KEY: "proprio", ENV_STATE_KEY: "env_state"}[self.lerobot_key]

    @property
    def robolora_shape(self) -> tuple[int, ...]:
        return (self.shape[1], self.shape[2], 3) if self.type == "VISUAL" else self.shape


@dataclass(frozen=True)
class LeRobotFeatures:
    """What a LeRobot policy's ``config.json`` says about its spaces, read without lerobot."""

    policy_type: str
    inputs: tuple[Feature, ...]
    action_dim: int
    chunk_size: int
    execution: Execution

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = CONFIG_FILE) -> LeRobotFeatures:
        """Parse a LeRobot ``config.json`` dict; errors name the field and what to fix."""
        policy_type = config.get("type")
        if policy_type not in SUPPORTED_TYPES:
            raise ValueError(f"{where}: LeRobot policy type {policy_type!r} is not supported; robolora's LeRobot "
                             f"integration supports {list(SUPPORTED_TYPES)}")
        if config.get("n_obs_steps", 1) != 1:
            raise ValueError(f"{where}: n_obs_steps={config['n_obs_steps']}; robolora feeds one observation per "
                             "query (n_obs_steps=1)")
        inputs = []
        for key, feature in _features(config, "input_features", where).items():
            kind, shape = feature
            if kind == "VISUAL":
                if len(shape) != 3 or shape[0] != 3:
                    raise ValueError(f"{where}: input feature {key!r} has shape {list(shape)}; robolora reads RGB "
                                     "images, shape [3, H, W]")
            elif (kind, key) not in (("STATE", STATE_KEY), ("ENV", ENV_STATE_KEY)) or len(shape) != 1:
                raise ValueError(f"{where}: input feature {key!r} ({kind}, shape {list(shape)}) has no robolora "
                                 f"observation; supported: VISUAL {IMAGE_PREFIX}<camera> [3, H, W], STATE "
                                 f"{STATE_KEY} [P], ENV {ENV_STATE_KEY} [E]")
            inputs.append(Feature(key, kind, shape))
        robolora_keys = [f.key for f in inputs]
        if len(set(robolora_keys)) != len(robolora_keys):
            raise ValueError(f"{where}: input features {[f.lerobot_key for f in inputs]} map to clashing robolora "
                             f"keys {robolora_keys}")
        outputs = _features(config, "output_features", where)
        if set(outputs) != {ACTION_KEY} or outputs[ACTION_KEY][0] != "ACTION" or len(outputs[ACTION_KEY][1]) != 1:
            raise ValueError(f"{where}: output_features must be one ACTION feature {ACTION_KEY!r} of shape [A], got "
                             f"{ {k: v[0] for k, v in outputs.items()} }")
        chunk = config.get("chunk_size")
        steps = config.get("n_action_steps", chunk)
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"{where}: chunk_size={chunk!r} must be an int >= 1")
        execution = Execution(steps, config.get("temporal_ensemble_coeff")).check(chunk)
        return cls(policy_type, tuple(inputs), outputs[ACTION_KEY][1][0], chunk, execution)

    @property
    def key_map(self) -> dict[str, str]:
        """robolora observation key -> LeRobot feature key."""
        return {f.key: f.lerobot_key for f in self.inputs}


def _features(config: Mapping[str, Any], field: str, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    features = config.get(field)
    if not isinstance(features, Mapping) or not features:
        raise ValueError(f"{where}: {field} is missing or empty; a trained LeRobot policy lists its features there")
    try:
        return {k: (str(v["type"]), tuple(int(s) for s in v["shape"])) for k, v in features.items()}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: {field} entries need a type and a shape ({err})") from err


# ----------------------------------------------------------------------------------------------- normalisation


class FeatureNormalization(nn.Module):
    """LeRobot's (un)normalisation of one feature (``lerobot.processor.normalize_processor``), as buffers.

    MEAN_STD: (x - mean) / (std + eps), inverse x * std + mean. Range modes (MIN_MAX, QUANTILES, QUANTILE10):
    2 (x - low) / (high - low) - 1, inverse (x + 1) / 2 (high - low) + low, with eps for a zero range. IDENTITY
    (or a feature without statistics) passes x through.
    """

    def __init__(self, mode: str, stats: Mapping[str, torch.Tensor], eps: float, visual: bool = False) -> None:
        super().__init__()
        if mode not in ("MEAN_STD", "IDENTITY", *_RANGE_STATS):
            raise ValueError(f"unsupported LeRobot normalisation mode {mode!r}; supported: MEAN_STD, MIN_MAX, "
                             "QUANTILES, QUANTILE10, IDENTITY")
        self.mode, self.eps = mode, float(eps)
        self.names = ("mean", "std") if mode == "MEAN_STD" else _RANGE_STATS.get(mode, ())  # buffers, LeRobot's names
        missing = [n for n in self.names if n not in stats]
        if missing:
            raise ValueError(f"{mode} normalisation needs the statistics {list(self.names)}, the processor state "
                             f"lacks {missing}")
        for name in self.names:
            value = torch.as_tensor(stats[name], dtype=torch.float32)
            self.register_buffer(name, value.reshape(-1, 1, 1) if visual and value.ndim == 1 else value.clone())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "MEAN_STD":
            return (x - self.mean) / (self.std + self.eps)
        if self.mode in _RANGE_STATS:
            low, span = self._range()
            return 2 * (x - low) / span - 1
        return x

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "MEAN_STD":
            return x * self.std + self.mean
        if self.mode in _RANGE_STATS:
            low, span = self._range()
            return (x + 1) / 2 * span + low
        return x

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high - low), a zero span replaced by eps as LeRobot does."""
        low, high = (getattr(self, name) for name in self.names)
        span = high - low
        return low, torch.where(span == 0, torch.full_like(span, self.eps), span)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(centre, spread) of the normalised range in input units: probes draw around them. None for IDENTITY."""
        if self.mode == "MEAN_STD":
            return self.mean, self.std
        if self.mode in _RANGE_STATS:
            low, span = self._range()
            return low + span / 2, (span / 2).abs()
        return None

    def extra_repr(self) -> str:
        return f"mode={self.mode}, eps={self.eps:g}"


class LeRobotNormalization(nn.Module):
    """The normaliser (inputs and training targets) and unnormaliser (predicted actions) of a LeRobot policy."""

    def __init__(self, inputs: Mapping[str, FeatureNormalization], action_in: FeatureNormalization,
                 action_out: FeatureNormalization) -> None:
        super().__init__()
        self.inputs = nn.ModuleDict({_module_key(k): v for k, v in inputs.items()})
        self.action_in, self.action_out = action_in, action_out

    @classmethod
    def from_steps(cls, normalizer: Mapping[str, Any], normalizer_state: Mapping[str, torch.Tensor],
                   unnormalizer: Mapping[str, Any], unnormalizer_state: Mapping[str, torch.Tensor],
                   input_keys: list[str]) -> LeRobotNormalization:
        """From the two steps' configs (``get_config()``: features, norm_map, eps, as in the processor JSON) and
        states (``state_dict()``: flat ``"<feature>.<stat>"`` tensors, as in the step's safetensors file)."""
        def build(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], key: str) -> FeatureNormalization:
            feature_type = str(config.get("features", {}).get(key, {}).get("type", "ACTION" if key == ACTION_KEY
                                                                               else "STATE"))
            stats = {name.rpartition(".")[2]: v for name, v in state.items() if name.rpartition(".")[0] == key}
            mode = str(config.get("norm_map", {}).get(feature_type, "IDENTITY")) if stats else "IDENTITY"
            return FeatureNormalization(mode, stats, config.get("eps", 1e-8), visual=feature_type == "VISUAL")

        return cls({k: build(normalizer, normalizer_state, k) for k in input_keys},
                   build(normalizer, normalizer_state, ACTION_KEY),
                   build(unnormalizer, unnormalizer_state, ACTION_KEY))

    def input(self, lerobot_key: str) -> FeatureNormalization:
        return self.inputs[_module_key(lerobot_key)]


def _module_key(lerobot_key: str) -> str:
    return lerobot_key.replace(".", "__")  # module names cannot hold dots


def read_processor_steps(preprocessor: Any, postprocessor: Any) -> tuple[dict, dict, dict, dict]:
    """(normaliser config, state, unnormaliser config, state) of LeRobot ``PolicyProcessorPipeline`` objects, through
    each step's public ``get_config()`` / ``state_dict()``. Steps the wrapper cannot reproduce are refused."""
    found: dict[str, Any] = {}
    for pipeline, wanted in ((preprocessor, _NORMALIZER), (postprocessor, _UNNORMALIZER)):
        for step in pipeline.steps:
            name = _registry_name(step)
            if name == wanted:
                found[name] = step
            elif name not in _PASSIVE_STEPS:
                raise ValueError(f"the LeRobot {pipeline.name} holds a {name!r} step, which robolora cannot reproduce "
                                 f"inside the policy (it handles {sorted(_PASSIVE_STEPS | {wanted})})")
    missing = [n for n in (_NORMALIZER, _UNNORMALIZER) if n not in found]
    if missing:
        raise ValueError(f"the LeRobot processor pipelines lack {missing}; save the policy's pre/post-processors "
                         f"beside it ({PREPROCESSOR}.json, {POSTPROCESSOR}.json)")
    norm, unnorm = found[_NORMALIZER], found[_UNNORMALIZER]
    return norm.get_config(), norm.state_dict(), unnorm.get_config(), unnorm.state_dict()


def _registry_name(step: Any) -> str:
    from lerobot.processor import ProcessorStepRegistry

    for name in ProcessorStepRegistry.list():
        if ProcessorStepRegistry.get(name) is type(step):
            return name
    return type(step).__name__


# ------------------------------------------------------------------------------------------------------ policy


class LeRobotPolicy(ChunkedActing, nn.Module):
    """A LeRobot ``PreTrainedPolicy`` behind robolora's policy protocol (module docstring).

    ``predict_chunk(batch)``: robolora batch -> LeRobot batch (images CHW in [0, 1], every input normalised) ->
    the LeRobot policy's ``predict_action_chunk`` -> unnormalised (B, K, A) in env units, clamped to
    ``action_bounds`` when given. ``forward(batch)``: the LeRobot policy's own loss on the normalised batch (action
    targets normalised too), metrics as ``train/<name>``. ``reset``/``select_action``/``set_execution``: robolora's
    chunk executor, starting from the config's ``n_action_steps`` / ``temporal_ensemble_coeff``.
    """

    # LoRA targets of LeRobot's ACT: every attention projection of the transformer's encoder and decoder (not the
    # VAE encoder, which only training runs); the MLP targets add each layer's linear1/linear2
    lora_targets: tuple[str, ...] = (r"re:model\.(encoder|decoder)\.layers\.\d+\.(self_attn|multihead_attn)\."
                                     r"(q|k|v|out_proj)",)
    lora_mlp_targets: tuple[str, ...] = (r"re:model\.(encoder|decoder)\.layers\.\d+\.linear[12]",)
    # the vision encoder's convolutions (train-skill --conv): every nn.Conv2d of the ResNet backbone and the 1x1
    # projection of its feature map into the transformer (FrozenBatchNorm2d layers stay as they are)
    lora_conv_targets: tuple[str, ...] = (r"re:model\.backbone\..+", "model.encoder_img_feat_input_proj")

    def __init__(self, policy: nn.Module, config: Mapping[str, Any], normalization: LeRobotNormalization, *,
                 action_bounds: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.features = LeRobotFeatures.from_config(config)
        self.lerobot_config = dict(config)
        own = {"normalization"}
        clash = own & {name for name, _ in policy.named_children()}
        if clash or next(policy.named_parameters(recurse=False), None) or next(policy.named_buffers(recurse=False),
                                                                               None):
            raise ValueError(f"{type(policy).__name__} holds parameters outside its submodules or a submodule named "
                             f"{sorted(clash)}; robolora cannot wrap it under LeRobot's module names")
        # The LeRobot policy's submodules become ours under their own names (LoRA targets, state_dict keys and PEFT
        # keys stay LeRobot's); the policy object itself is kept outside the module tree so nothing registers twice
        for name, child in policy.named_children():
            self.add_module(name, child)
        self.__dict__["lerobot_policy"] = policy
        self.normalization = normalization
        if action_bounds is not None and not action_bounds[0] < action_bounds[1]:
            raise ValueError(f"action_bounds={action_bounds} must be (low, high) with low < high")
        self.action_bounds = action_bounds
        self._execution = self.features.execution

    # ---- the protocol (robolora.policy) --------------------------------------------------------------------

    @property
    def spec(self) -> PolicySpec:
        """Observation keys per the module docstring's table, the action space, chunk and default execution."""
        observation = {}
        for f in self.features.inputs:
            if f.type == "VISUAL":
                observation[f.key] = TensorSpec(f.robolora_shape, "uint8", 0, 255)
                continue
            moments = self.normalization.input(f.lerobot_key).moments()
            mean, std = (None, None) if moments is None else (moments[0].tolist(), moments[1].tolist())
            observation[f.key] = TensorSpec(f.robolora_shape, "float32", mean=mean, std=std)
        low, high = self.action_bounds or (None, None)
        return PolicySpec(observation=observation, action=TensorSpec((self.features.action_dim,), "float32", low,
                                                                     high),
                          chunk_size=self.features.chunk_size, execution=self._execution)

    def predict_chunk(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Action chunk (B, K, A) in env units (LeRobot's ``predict_action_chunk`` runs under ``no_grad``)."""
        policy, inputs = self.lerobot_policy, self.lerobot_batch(batch)
        if self.training or policy.training:  # the LeRobot object sits outside our tree: its own flag is LeRobot's
            chunk = policy.predict_action_chunk(inputs)  # (B, K, A) normalised
        else:  # LeRobot's predict_action_chunk calls self.eval() on every query, which walks every submodule: with
            # 16 skills attached (576 modules) about 1.5 ms of a 22 ms query; already in eval mode, it is a no-op
            policy.__dict__["eval"] = lambda: policy
            try:
                chunk = policy.predict_action_chunk(inputs)  # (B, K, A) normalised
            finally:
                del policy.__dict__["eval"]
        chunk = self.normalization.action_out.unnormalize(chunk)  # (B, K, A)
        return chunk if self.action_bounds is None else chunk.clamp(*self.action_bounds)

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The LeRobot policy's training loss (ACT: masked L1, plus the KL term when it uses its VAE)."""
        loss, info = self.lerobot_policy.forward(self.lerobot_batch(batch, training=True))
        return loss, {"train/loss": float(loss.detach()), **{f"train/{k}": float(v) for k, v in info.items()}}

    def _set_default_execution(self, execution: Execution) -> None:
        self._execution = execution

    # ---- batches ---------------------------------------------------------------------------------------------

    def lerobot_batch(self, batch: Mapping[str, Any], training: bool = False) -> dict[str, torch.Tensor]:
        """A robolora batch as the LeRobot policy's normalised input batch (what its preprocessor would make)."""
        self.check_batch(batch, training)
        out: dict[str, torch.Tensor] = {}
        for f in self.features.inputs:
            x = batch[f.key]
            x = x.permute(0, 3, 1, 2).float() / 255.0 if f.type == "VISUAL" else x.float()  # images (B, 3, H, W)
            out[f.lerobot_key] = self.normalization.input(f.lerobot_key).normalize(x)
        if training:
            out[ACTION_KEY] = self.normalization.action_in.normalize(batch["action"].float())  # (B, K, A)
            out["action_is_pad"] = batch["action_is_pad"].bool()  # (B, K)
        return out

    def check_batch(self, batch: Mapping[str, Any], training: bool = False) -> None:
        """Raise naming the missing or misshapen key unless ``batch`` fits the policy's inputs."""
        need = [f.key for f in self.features.inputs] + (["action", "action_is_pad"] if training else [])
        missing = [k for k in need if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing} (has {sorted(batch)}); this LeRobot {self.features.policy_type} "
                           f"reads {need} (LeRobot features {self.features.key_map})")
        K, A = self.features.chunk_size, self.features.action_dim
        shapes = {f.key: f.robolora_shape for f in self.features.inputs}
        if training:
            shapes.update(action=(K, A), action_is_pad=(K,))
        for key, shape in shapes.items():
            got = tuple(batch[key].shape)
            if got[1:] != shape:
                raise ValueError(f"batch[{key!r}] has shape {got}, the policy reads (B, {', '.join(map(str, shape))})"
                                 + (f" (LeRobot feature {self.features.key_map[key]!r})"
                                    if key in self.features.key_map else ""))


def resolve_lerobot_policy_folder(path: str | Path) -> Path:
    """A saved LeRobot policy folder: ``path`` itself, or the last checkpoint of a ``lerobot-train`` output folder
    (``checkpoints/last/pretrained_model``) when ``path`` is one."""
    path = Path(path)
    last = path / "checkpoints" / "last" / "pretrained_model"
    return last if not (path / CONFIG_FILE).is_file() and (last / CONFIG_FILE).is_file() else path


def is_lerobot_policy_folder(path: str | Path) -> bool:
    """Whether ``path`` (or the last checkpoint of a ``lerobot-train`` run in it) holds a LeRobot policy's
    ``config.json``: a JSON object with a string ``"type"`` (robolora's checkpoints have none). Read without lerobot;
    whether the type is supported is :func:`read_lerobot_features`'s question."""
    path = resolve_lerobot_policy_folder(path) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and isinstance(config.get("type"), str) and "format" not in config


def read_lerobot_features(folder: str | Path) -> LeRobotFeatures:
    """What a saved LeRobot policy folder reads and writes, from its ``config.json`` alone (no lerobot needed):
    refuses a folder that is not a complete LeRobot policy folder or whose policy type is not supported."""
    folder = Path(folder)
    return LeRobotFeatures.from_config(_read_config(folder), str(folder / CONFIG_FILE))


def load_lerobot_policy(folder: str | Path, *, device: str = "cpu",
                        action_bounds: tuple[float, float] | None = None) -> LeRobotPolicy:
    """Load a saved LeRobot policy folder as a frozen, eval-mode ``LeRobotPolicy`` on ``device``.

    The folder holds ``config.json``, ``model.safetensors`` (loaded strictly: every tensor present, none extra)
    and the processor files; a ``lerobot-train`` output folder stands for its last checkpoint. Nothing is
    downloaded: the config's ``pretrained_backbone_weights`` is ignored (the weights come from
    ``model.safetensors``). ``action_bounds`` clamps predicted actions (e.g. (-1, 1) for robolora's envs); without
    it actions are LeRobot's, unclamped.
    """
    folder = resolve_lerobot_policy_folder(folder)
    config = _read_config(folder)
    read_lerobot_features(folder)  # refuse before importing lerobot
    require_lerobot()
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors
    from safetensors.torch import load_file

    cfg = PreTrainedConfig.from_pretrained(folder)
    cfg.device = device
    if getattr(cfg, "pretrained_backbone_weights", None) is not None:
        cfg.pretrained_backbone_weights = None  # ImageNet weights would be downloaded, then overwritten
    policy = get_policy_class(cfg.type)(cfg)
    missing, unexpected = policy.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match its config.json: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; the folder is incomplete or mixed from two policies")
    preprocessor, postprocessor = make_pre_post_processors(cfg, pretrained_path=str(folder))
    steps = read_processor_steps(preprocessor, postprocessor)
    features = LeRobotFeatures.from_config(config)
    normalization = LeRobotNormalization.from_steps(*steps, [f.lerobot_key for f in features.inputs])
    for name, module in normalization.named_modules():
        if isinstance(module, FeatureNormalization) and module.mode == "MEAN_STD" and (module.std == 0).any():
            logger.warning("%s: %s has std 0 in elements %s of the policy's statistics (constant in its training "
                           "data), so any other value normalises to about 1e8 (LeRobot's eps); data that varies "
                           "them (a new skill's) will not train", folder, name,
                           (module.std == 0).flatten().nonzero().flatten().tolist())
    wrapper = LeRobotPolicy(policy, config, normalization, action_bounds=action_bounds)
    wrapper.requires_grad_(False)
    logger.info("loaded LeRobot %s from %s (%d parameters)", features.policy_type, folder,
                sum(p.numel() for p in wrapper.parameters()))
    return wrapper.to(device).eval()


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not folder.is_dir() or not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a saved LeRobot policy folder: it needs {CONFIG_FILE}, "
                                f"{WEIGHTS_FILE} and the processor files ({PREPROCESSOR}.json, "
                                f"{POSTPROCESSOR}.json), as policy.save_pretrained + the processors' save_pretrained "
                                "write them")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config

