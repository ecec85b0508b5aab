"""Load pretrained DDPM weights into :class:`ddim_edu.image.unet.UNet`: ``load_unet(path_or_name) -> UNet`` (eval mode).

Three layouts of the same network are read; keys are mapped, never matched loosely: a checkpoint
that does not fit (missing or unexpected keys, wrong shapes) raises :class:`CheckpointError`
listing all of them, and a corrupt file raises it too. Only safetensors files and
``torch.load(..., weights_only=True)`` are used, so loading never runs code from the file.

1. **diffusers** (``UNet2DModel``, e.g. the published ``google/ddpm-cifar10-32``): a folder with
   ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``), or such a folder
   under ``unet/``. The config is translated by :func:`config_from_diffusers`; settings our UNet
   does not implement are refused. Names map as

   ====================================  ==============================================
   ours                                  diffusers
   ====================================  ==============================================
   ``temb.dense.{0,1}``                  ``time_embedding.linear_{1,2}``
   ``down.{i}.block.{j}``                ``down_blocks.{i}.resnets.{j}``
   ``down.{i}.attn.{j}``                 ``down_blocks.{i}.attentions.{j}``
   ``down.{i}.downsample.conv``          ``down_blocks.{i}.downsamplers.0.conv``
   ``mid.block_1 / attn_1 / block_2``    ``mid_block.resnets.0 / attentions.0 / resnets.1``
   ``up.{i}.block.{j}`` (level i)        ``up_blocks.{L-1-i}.resnets.{j}`` (L levels)
   ``up.{i}.attn.{j}``                   ``up_blocks.{L-1-i}.attentions.{j}``
   ``up.{i}.upsample.conv``              ``up_blocks.{L-1-i}.upsamplers.0.conv``
   ``norm_out``                          ``conv_norm_out``
   ====================================  ==============================================

   and inside the blocks ``temb_proj`` ↔ ``time_emb_proj``, ``nin_shortcut`` ↔ ``conv_shortcut``,
   ``attn.norm / q / k / v / proj_out`` ↔ ``group_norm / to_q / to_k / to_v / to_out.0``.
   diffusers' older attention names ``query / key / value / proj_attn`` (which checkpoints saved
   before diffusers 0.15 carry, and which diffusers itself still renames on load) are accepted too.

2. **reference** (the DDPM code as ported to PyTorch by pesser/pytorch_diffusion and used by
   ermongroup/ddim, ``models/diffusion.py``): a single state-dict file whose names are ours —
   ``temb.dense.{0,1}``, ``conv_in``, ``down.{i}.block.{j}.{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}``,
   ``down.{i}.attn.{j}.{norm,q,k,v,proj_out}``, ``down.{i}.downsample.conv``,
   ``mid.{block_1,attn_1,block_2}``, ``up.{i}.block.{j}``, ``up.{i}.attn.{j}``, ``up.{i}.upsample.conv``,
   ``norm_out``, ``conv_out`` — with ``up.{i}`` indexed by resolution level (the code builds the
   up path from the bottom and prepends). The one difference: q, k, v and proj_out are 1×1
   convolutions there, weights [C, C, 1, 1], where ours are linear maps [C, C]. A common
   ``module.`` (DataParallel) or ``model.`` prefix is removed. Such a file carries no config:
   pass ``config=`` unless it is the CIFAR-10 model (the default :class:`UNetConfig`).

3. **ours**: ``torch.save(unet.state_dict(), path)`` or ``safetensors.torch.save_file``, read the same way.

Models that ship inside the package are loaded by name: :data:`NAMED_MODELS` maps each name to its
safetensors weights and the JSON holding its UNetConfig, files of ``toy_data/`` (the package data
``ddim_edu.toy_data``). ``load_unet("digits")`` is a 1.0M-parameter UNet trained on scikit-learn's
8×8 digits (``toy_data/make_digits_unet.py`` made it; ``toy_data/README.md`` says how).

``safetensors`` is a dependency of the package; ``huggingface_hub`` (the ``hub`` extra; diffusers
installs it too) is needed only for ``download=True`` and to look in the Hugging Face cache.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..utils.files import load_weights_only
from ..utils.package_data import package_file
from .unet import UNet, UNetConfig

__all__ = [
    "CONFIG_NAME",
    "CheckpointError",
    "NAMED_MODELS",
    "WEIGHTS_NAMES",
    "config_from_diffusers",
    "diffusers_config",
    "find_cached",
    "load_unet",
    "read_state_dict",
    "read_unet_config",
    "to_diffusers_state_dict",
    "to_reference_state_dict",
    "unet_from_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# UNet2DModel.__init__ defaults (diffusers 0.42): what diffusers assumes for a key config.json lacks.
DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}

_DIFFUSERS_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                     "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_DIFFUSERS_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_DIFFUSERS_TOP = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
_DIFFUSERS_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
_DEPRECATED_ATTN = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")
_DEPRECATED_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_WEIGHT = re.compile(r"(^|\.)(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: The models that ship with the package: name -> (safetensors weights, JSON whose "unet_config" holds the
#: UNetConfig fields), both files of toy_data/ (the package data ddim_edu.toy_data).
NAMED_MODELS = {
    "digits": ("digits_unet.safetensors", "digits_unet.json"),  # scikit-learn's 8×8 digits, 1 channel; toy_data/make_digits_unet.py
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not fit the model."""


# --- configs ------------------------------------------------------------------------------

def config_from_diffusers(cfg: Mapping) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers ``UNet2DModel`` config (the dict in its config.json).

    Keys the dict lacks take diffusers' defaults, as diffusers itself does (so a config without
    ``attention_head_dim`` means heads of 8 channels). Settings our UNet does not implement
    (other block types, class conditioning, ``downsample_padding != 0``, ...) raise
    :class:`CheckpointError` naming each of them.
    """
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"a diffusers config must be a JSON object, got {type(cfg).__name__}")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"config.json describes a {cfg['_class_name']!r}, not a UNet2DModel")
    get = lambda key: cfg.get(key, DIFFUSERS_DEFAULTS[key])
    problems = []

    def require(key, allowed):
        if get(key) not in allowed:
            problems.append(f"{key}={get(key)!r} (supported: {' or '.join(repr(a) for a in allowed)})")

    require("center_input_sample", (False,))
    require("time_embedding_type", ("positional",))
    require("mid_block_type", ("UNetMidBlock2D",))
    require("mid_block_scale_factor", (1,))
    require("downsample_padding", (0,))  # DDPM's pad-bottom-right-then-stride-2 convolution
    require("downsample_type", ("conv",))
    require("upsample_type", ("conv",))
    require("act_fn", ("silu", "swish"))
    require("resnet_time_scale_shift", ("default",))
    require("add_attention", (True,))
    require("class_embed_type", (None,))
    require("num_class_embeds", (None,))

    size = get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int):
        problems.append(f"sample_size={size!r} (a square size is needed to place the attention layers)")
    channels = get("block_out_channels")
    channels = list(channels) if isinstance(channels, (list, tuple)) else channels
    counts = isinstance(channels, list) and channels and all(type(c) is int and c > 0 for c in channels)
    base = channels[0] if counts else 1
    if not counts or any(c % base for c in channels):
        problems.append(f"block_out_channels={channels!r} (positive integers, each a multiple of the first)")
    groups = get("norm_num_groups")
    require("attn_norm_num_groups", (None, groups))
    require("time_embedding_dim", (None, 4 * base))
    if get("out_channels") != get("in_channels"):
        problems.append(f"out_channels={get('out_channels')!r} != in_channels={get('in_channels')!r}")
    down, up = (list(v) if isinstance(v, (list, tuple)) else [v] for v in (get("down_block_types"), get("up_block_types")))
    if not counts:
        channels = [None] * len(down)  # the block types are checked against the number of levels all the same
    if len(down) != len(channels) or any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in down):
        problems.append(f"down_block_types={down!r} (one DownBlock2D or AttnDownBlock2D per level)")
    mirror = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    if up != mirror:
        problems.append(f"up_block_types={up!r} (supported: the mirror of down_block_types, {mirror!r})")
    if problems:
        raise CheckpointError("unsupported UNet2DModel settings: " + "; ".join(problems))

    try:
        return UNetConfig(
            image_size=size,
            in_channels=get("in_channels"),
            base_channels=base,
            channel_mult=tuple(c // base for c in channels),
            num_res_blocks=get("layers_per_block"),
            attention_resolutions=tuple(size // 2**i for i, b in enumerate(down) if b == "AttnDownBlock2D"),
            dropout=float(get("dropout")),
            norm_groups=groups,
            norm_eps=float(get("norm_eps")),
            attention_head_dim=get("attention_head_dim"),
            flip_sin_to_cos=bool(get("flip_sin_to_cos")),
            freq_shift=float(get("freq_shift")),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"the diffusers config does not give a valid UNetConfig: {e}") from None


def read_unet_config(path) -> UNetConfig:
    """A :class:`UNetConfig` from a JSON file: a diffusers ``config.json``, the fields of UNetConfig, or an object
    holding them under ``"unet_config"`` (a named model's JSON, a sample run's manifest.json)."""
    path = Path(path)
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the model config {path}: {e}") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(fields).__name__}")
    if isinstance(fields.get("unet_config"), dict):
        fields = fields["unet_config"]
    if "block_out_channels" in fields:  # diffusers' UNet2DModel config
        return config_from_diffusers(fields)
    try:
        return UNetConfig(**fields)
    except TypeError as e:
        raise CheckpointError(f"{path} is neither a diffusers config.json nor UNetConfig fields: {e}") from None


def diffusers_config(config: UNetConfig) -> dict:
    """The ``UNet2DModel`` keyword arguments (config.json contents) of the same network: the inverse of :func:`config_from_diffusers`."""
    c = config
    down = ["AttnDownBlock2D" if r in c.attention_resolutions else "DownBlock2D" for r in c.resolutions]
    plain = lambda v: int(v) if float(v).is_integer() else v
    return {
        "sample_size": c.image_size, "in_channels": c.in_channels, "out_channels": c.in_channels,
        "block_out_channels": [c.base_channels * m for m in c.channel_mult],
        "down_block_types": down,
        "up_block_types": ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)],
        "layers_per_block": c.num_res_blocks, "norm_num_groups": c.norm_groups, "norm_eps": c.norm_eps,
        "attention_head_dim": c.attention_head_dim, "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": plain(c.freq_shift), "downsample_padding": 0, "dropout": c.dropout, "act_fn": "silu",
        "mid_block_scale_factor": 1, "time_embedding_type": "positional", "center_input_sample": False,
    }


# --- key maps -----------------------------------------------------------------------------

def _num_levels(keys) -> int:
    levels = {int(k.split(".")[1]) for k in keys if k.startswith("down.")}
    return max(levels) + 1 if levels else 0


def _diffusers_key(key: str, num_levels: int) -> str:
    """Our parameter name -> diffusers' UNet2DModel name (the table in the module docstring)."""
    parts = key.split(".")
    head, param = parts[0], parts[-1]
    if head == "temb":  # temb.dense.{0,1}.weight
        return f"time_embedding.linear_{int(parts[2]) + 1}.{param}"
    if head in _DIFFUSERS_TOP:
        return f"{_DIFFUSERS_TOP[head]}.{param}"
    if head == "mid":  # mid.block_1.conv1.weight, mid.attn_1.q.weight
        inner = _DIFFUSERS_RESNET if parts[1].startswith("block") else _DIFFUSERS_ATTN
        return f"mid_block.{_DIFFUSERS_MID[parts[1]]}.{inner[parts[2]]}.{param}"
    if head in ("down", "up"):  # down.{i}.block.{j}.conv1.weight, up.{i}.upsample.conv.weight
        i = int(parts[1])
        prefix = f"down_blocks.{i}" if head == "down" else f"up_blocks.{num_levels - 1 - i}"
        kind = parts[2]
        if kind == "block":
            return f"{prefix}.resnets.{parts[3]}.{_DIFFUSERS_RESNET[parts[4]]}.{param}"
        if kind == "attn":
            return f"{prefix}.attentions.{parts[3]}.{_DIFFUSERS_ATTN[parts[4]]}.{param}"
        if kind in ("downsample", "upsample"):
            return f"{prefix}.{kind}rs.0.conv.{param}"
    raise KeyError(f"no diffusers name for {key!r}")


def to_diffusers_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict (``unet.state_dict()``) renamed to diffusers' ``UNet2DModel`` layout."""
    n = _num_levels(state_dict)
    return {_diffusers_key(k, n): v for k, v in state_dict.items()}


def to_reference_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict in the layout of the DDPM/DDIM PyTorch code: same names, attention q/k/v/proj_out
    weights as 1×1 convolution kernels [C, C, 1, 1]."""
    return {k: v[:, :, None, None] if _ATTN_WEIGHT.search(k) else v for k, v in state_dict.items()}


def _strip_prefix(keys: list[str]) -> str:
    for prefix in ("module.", "model."):
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _is_diffusers(keys) -> bool:
    return any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "time_embedding.", "conv_norm_out.")) for k in keys)


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
    return f"{title} ({len(items)}): " + ", ".join(shown)


def unet_from_state_dict(state_dict: Mapping[str, Tensor], config: UNetConfig | None = None, *,
                         source: str = "checkpoint") -> UNet:
    """A :class:`UNet` (eval mode) holding the tensors of ``state_dict``, in any of the three layouts.

    ``config`` defaults to the CIFAR-10 :class:`UNetConfig`. Every parameter of the model must be
    present exactly once with its shape; otherwise :class:`CheckpointError` lists the missing keys,
    the unexpected keys and the shape mismatches (``source`` names the file in the message).
    """
    if not isinstance(state_dict, Mapping):
        hint = ""
        if isinstance(state_dict, (list, tuple)):
            hint = (" A list is what ermongroup/ddim's training checkpoint ckpt.pth holds: [model, optimizer, "
                    "epoch, step(, ema)]. Load it with torch.load(path, weights_only=True) and pass the state "
                    "dict you want (states[-1] is the EMA, the weights to sample with) to unet_from_state_dict.")
        raise CheckpointError(f"{source} holds a {type(state_dict).__name__}, not a state dict of tensors.{hint}")
    if isinstance(state_dict.get("ema"), dict) and "step" in state_dict:
        raise CheckpointError(f"{source} is a training checkpoint of ddim_edu.image.training, not a state dict: "
                              "sample from its EMA weights with --checkpoint (in Python, ddim_edu.image.training.load_checkpoint_unet)")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: " + _listing("entries that are not named tensors", [repr(k) for k in bad]))
    config = UNetConfig() if config is None else config
    model = UNet(config)
    expected = model.state_dict()

    prefix = _strip_prefix(list(state_dict))
    tensors = {k[len(prefix):]: v for k, v in state_dict.items()}
    if _is_diffusers(tensors):
        layout = "diffusers"
        tensors = {_DEPRECATED_ATTN.sub(lambda m: f"{m[1]}.{_DEPRECATED_NEW[m[2]]}.", k): v for k, v in tensors.items()}
        n = config.num_levels
        source_name = {k: _diffusers_key(k, n) for k in expected}
    else:
        layout = "reference"
        source_name = {k: k for k in expected}
    ours_of = {s: k for k, s in source_name.items()}

    converted, seen, unexpected, mismatched = {}, set(), [], []
    for name, value in tensors.items():
        key = ours_of.get(name)
        if key is None:
            unexpected.append(prefix + name)
            continue
        seen.add(key)
        want = expected[key].shape
        if value.ndim == 4 and len(want) == 2 and value.shape[2:] == (1, 1) and _ATTN_WEIGHT.search(key):
            value = value[:, :, 0, 0]  # a 1×1 convolution kernel is a linear map
        if value.shape != want:
            mismatched.append(f"{prefix + name}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
            continue
        converted[key] = value
    missing = [prefix + source_name[k] for k in expected if k not in seen]
    if missing or unexpected or mismatched:
        parts = [f"{source} ({layout} layout) does not fit UNet({config})."]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        parts.append("A checkpoint without config.json needs the matching config= (--config on the command line; "
                     "the default is the CIFAR-10 UNetConfig()).")
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(converted, strict=True)
    return model.eval()


# --- files --------------------------------------------------------------------------------

def read_state_dict(path: str | Path):
    """The tensors of a ``.safetensors`` file (``safetensors.torch.load_file``) or of any other file via
    ``torch.load(path, map_location="cpu", weights_only=True)``; unreadable files raise :class:`CheckpointError`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("reading .safetensors files needs the safetensors package: pip install safetensors") from None
        try:  # the system's reason first: safetensors reports an unreadable file as a missing one
            with open(path, "rb"):
                pass
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read: {e.strerror or e} ({type(e).__name__})") from None
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:  # SafetensorError: a bad header or a short file
            raise CheckpointError(f"{path} is not a readable safetensors file, it may be truncated or corrupt "
                                  f"(download it again): {type(e).__name__}: {e}") from None
    try:
        return load_weights_only(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _diffusers_folder(path: Path) -> Path | None:
    for folder in (path, path / "unet"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return None


def _load_diffusers_folder(folder: Path) -> UNet:
    config_file = folder / CONFIG_NAME
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    config = config_from_diffusers(cfg)
    for name in WEIGHTS_NAMES:
        if (folder / name).is_file():
            return unet_from_state_dict(read_state_dict(folder / name), config, source=str(folder / name))
    raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no weights: expected {' or '.join(WEIGHTS_NAMES)}")


def _download(repo_id: str, cache_dir, local_files_only: bool = False) -> Path | None:
    """The diffusers folder of ``repo_id`` from the Hugging Face Hub, through its cache.

    With ``local_files_only`` nothing is fetched: the folder of an earlier download, or None if the
    cache (or huggingface_hub itself) has none.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        if local_files_only:
            return None
        raise ImportError("download=True needs the huggingface_hub package: pip install huggingface_hub") from None
    for weights in WEIGHTS_NAMES:  # safetensors first; the pickled .bin only if the repo has no safetensors
        patterns = [CONFIG_NAME, weights, f"unet/{CONFIG_NAME}", f"unet/{weights}"]
        kwargs = {"local_files_only": True} if local_files_only else {}
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir, **kwargs))
        except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: not in the cache
            if local_files_only:
                return None
            raise
        found = _diffusers_folder(folder)
        if found is not None and (found / weights).is_file():
            return found
    if local_files_only:
        return None
    raise FileNotFoundError(f"the Hugging Face repo {repo_id!r} has no {CONFIG_NAME} with {' or '.join(WEIGHTS_NAMES)}")


def find_cached(repo_id: str, cache_dir: str | Path | None = None) -> Path | None:
    """The diffusers folder of the Hub model ``repo_id`` in the Hugging Face cache (an earlier download), or None.

    Nothing is fetched. ``cache_dir`` defaults to huggingface_hub's (``$HF_HUB_CACHE``, else
    ``~/.cache/huggingface/hub``); without huggingface_hub installed the answer is None.
    """
    return _download(repo_id, cache_dir, local_files_only=True) if _REPO_ID.match(repo_id) else None


def _load_named(name: str) -> UNet:
    """A model of :data:`NAMED_MODELS`: its safetensors weights (nothing is unpickled) in the UNet its JSON describes."""
    weights_name, config_name = NAMED_MODELS[name]
    weights, config_file = Path(package_file(weights_name)), Path(package_file(config_name))
    for file in (weights, config_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"the model {name!r} ships as {weights_name} and {config_name} in the package data, but {file} is missing; "
                "in a checkout of the repository rebuild them with the toy_data/make_*.py script that toy_data/README.md "
                "names (a wheel ships them: reinstall ddim-edu)")
    return unet_from_state_dict(read_state_dict(weights), read_unet_config(config_file), source=str(weights))


def load_unet(path_or_name: str | Path, *, config: UNetConfig | None = None, download: bool = False,
              cache_dir: str | Path | None = None) -> UNet:
    """Load a pretrained :class:`UNet` (eval mode): a model that ships with the package, a diffusers folder,
    a single checkpoint file, or a Hub name.

    - a name of :data:`NAMED_MODELS` (``"digits"``): the model's weights from the package data, its
      UNetConfig from the JSON beside them; the name wins over a local folder or file of the same name
      (reach that one as ``./digits``);
    - a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``), or with them
      under ``unet/``: the diffusers layout, its config read from config.json;
    - a file (``.safetensors``, or ``.ckpt``/``.pth``/``.pt``/``.bin`` read with ``weights_only=True``):
      a state dict in the reference, ours or diffusers layout, for the network ``config`` (default: CIFAR-10);
    - a Hugging Face repo id such as ``"google/ddpm-cifar10-32"`` that is not a local folder: taken
      from the Hugging Face cache (``cache_dir``, default ``$HF_HUB_CACHE`` or
      ``~/.cache/huggingface/hub``) if an earlier download put it there, else downloaded with
      ``huggingface_hub.snapshot_download`` only if ``download=True``; otherwise FileNotFoundError
      says which files to fetch and where to put them.
    """
    if isinstance(path_or_name, str) and path_or_name in NAMED_MODELS:
        if config is not None:
            raise ValueError(f"config= (--config on the command line) is for single checkpoint files; the model "
                             f"{path_or_name!r} that ships with the package has its own")
        return _load_named(path_or_name)
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        folder = _diffusers_folder(path)
        if folder is None:
            raise FileNotFoundError(f"{path} is not a diffusers model folder: it has no {CONFIG_NAME} (nor unet/{CONFIG_NAME}) "
                                    f"next to {' or '.join(WEIGHTS_NAMES)}")
        if config is not None:
            raise ValueError("config= (--config on the command line) is for single checkpoint files; "
                             "a diffusers folder's config.json defines the model")
        return _load_diffusers_folder(folder)
    if path.is_file():
        return unet_from_state_dict(read_state_dict(path), config, source=str(path))

    name = str(path_or_name)
    if not _REPO_ID.match(name):
        raise FileNotFoundError(f"no such checkpoint file or model folder: {str(path)!r}, nor a model that ships with "
                                f"the package (those are: {', '.join(NAMED_MODELS)})")
    cached = find_cached(name, cache_dir)
    if cached is not None:
        return _load_diffusers_folder(cached)
    if download:
        return _load_diffusers_folder(_download(name, cache_dir))
    raise FileNotFoundError(
        f"{name!r} is not a local folder (looked for {path.resolve()}) nor in the Hugging Face cache. "
        f"Nothing is downloaded unless you ask: "
        f"either call load_unet({name!r}, download=True) (on the command line: --download; needs huggingface_hub "
        f"and network access), or download "
        f"the two files {CONFIG_NAME} and {WEIGHTS_NAMES[0]} (or {WEIGHTS_NAMES[1]} if the repo has no safetensors) "
        f"from https://huggingface.co/{name} into the folder {path.resolve()} "
        f"(e.g. `hf download {name} {CONFIG_NAME} {WEIGHTS_NAMES[0]} --local-dir {name}`, the Hub's command line), "
        f"or pass the path of a folder holding them."
    )
