"""The DDPM UNet and its loaders: equal to diffusers' UNet2DModel on the same weights, parameter count,
the reference (DDPM/DDIM code) layout, bad checkpoints, and the model contract on a small config."""
import json
import sys
import types

import pytest
import torch

from ddim_edu.image.pretrained import (
    CheckpointError,
    config_from_diffusers,
    diffusers_config,
    find_cached,
    load_unet,
    to_diffusers_state_dict,
    to_reference_state_dict,
    unet_from_state_dict,
)
from ddim_edu.image.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers", reason="diffusers (the 'compare' extra) is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch")

# config.json of google/ddpm-cifar10-32, as published (diffusers' own bookkeeping keys left out).
PUBLISHED_CONFIG = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# Same block structure, small: 16×16, two levels, attention at 8×8, heads of 8 channels.
SMALL = UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
                   norm_groups=8, attention_head_dim=8)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_unet(config: dict, seed: int):
    """A seeded UNet2DModel whose GroupNorm scales and all biases are random too (the default init
    makes every norm the identity, which would hide a swapped norm in the key map)."""
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(config: UNetConfig, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    t = torch.rand(batch, generator=g) * 999  # fractional indices in [0, T-1]
    t[0] = 0.0
    return x, t


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    model = diffusers_unet(diffusers_config(SMALL), seed=1)
    folder = tmp_path_factory.mktemp("small")
    model.save_pretrained(folder)
    return model, folder


# --- (a) equal to diffusers -----------------------------------------------------------------

def test_published_config_loads_and_equals_diffusers(tmp_path):
    reference = diffusers_unet(PUBLISHED_CONFIG, seed=0)
    reference.save_pretrained(tmp_path)  # safetensors
    ours = load_unet(tmp_path)
    assert not ours.training
    assert ours.config == UNetConfig(dropout=0.0)  # the standard config; diffusers' config leaves dropout at 0
    x, t = inputs(ours.config, batch=2, seed=0)
    t[1] = 999.0
    with torch.no_grad():
        expected = reference(x, t).sample
        got = ours(x, t)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # (b) the parameter count of the published model, 35.7M, from the same config
    n_diffusers = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_diffusers == 35_746_307
    assert sum(p.numel() for p in UNet(UNetConfig()).parameters()) == n_diffusers


def test_small_config_equals_diffusers_multihead_and_bin(small_folder, tmp_path):
    reference, folder = small_folder
    x, t = inputs(SMALL, batch=3, seed=1)
    with torch.no_grad():
        expected = reference(x, t).sample
        torch.testing.assert_close(load_unet(folder)(x, t), expected, rtol=0, atol=1e-5)
        reference.save_pretrained(tmp_path, safe_serialization=False)  # diffusion_pytorch_model.bin
        torch.testing.assert_close(load_unet(tmp_path)(x, t), expected, rtol=0, atol=1e-5)


def test_other_time_embedding_and_single_head_equal_diffusers(tmp_path):
    """diffusers' own defaults: [cos, sin] order and freq_shift 0; one head over all channels."""
    config = UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), attention_resolutions=(16,),
                        norm_groups=8, flip_sin_to_cos=True, freq_shift=0.0)
    reference = diffusers_unet(diffusers_config(config), seed=5)
    reference.save_pretrained(tmp_path)
    ours = load_unet(tmp_path)
    assert ours.config == config
    x, t = inputs(config, batch=2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), reference(x, t).sample, rtol=0, atol=1e-5)


def test_key_map_covers_diffusers_exactly(small_folder):
    reference, _ = small_folder
    ours = UNet(SMALL)
    theirs = reference.state_dict()
    mapped = to_diffusers_state_dict(ours.state_dict())
    assert set(mapped) == set(theirs)
    assert all(mapped[k].shape == theirs[k].shape for k in theirs)


def test_deprecated_diffusers_attention_names(small_folder, tmp_path):
    """Checkpoints saved by old diffusers call the attention weights query/key/value/proj_attn."""
    reference, folder = small_folder
    tensors = safetensors_torch.load_file(str(folder / WEIGHTS))
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
           for k, v in tensors.items()}
    assert any(".proj_attn." in k for k in old)
    safetensors_torch.save_file(old, str(tmp_path / WEIGHTS))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    x, t = inputs(SMALL, batch=2, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(load_unet(tmp_path)(x, t), reference(x, t).sample, rtol=0, atol=1e-5)


def test_configs_translate_both_ways():
    assert config_from_diffusers(PUBLISHED_CONFIG) == UNetConfig(dropout=0.0)
    assert config_from_diffusers(diffusers_config(SMALL)) == SMALL
    published = diffusers_config(UNetConfig())
    assert {k: published[k] for k in PUBLISHED_CONFIG if not k.startswith("_")} == {
        k: v for k, v in PUBLISHED_CONFIG.items() if not k.startswith("_")}
    # a config.json without attention_head_dim means diffusers' default, heads of 8 channels
    no_head_dim = {k: v for k, v in PUBLISHED_CONFIG.items() if k != "attention_head_dim"}
    assert config_from_diffusers(no_head_dim).attention_head_dim == 8


# --- (c) the reference layout (DDPM / DDIM PyTorch code) -----------------------------------

def test_reference_layout_round_trip(tmp_path):
    torch.manual_seed(3)
    ours = UNet(SMALL).eval()
    ref = to_reference_state_dict(ours.state_dict())
    # the names of the DDPM/DDIM code, q/k/v/proj_out as 1×1 convolutions
    for key in ("temb.dense.0.weight", "temb.dense.1.bias", "conv_in.weight", "down.0.block.1.conv2.weight",
                "down.1.block.0.nin_shortcut.weight", "down.1.block.0.temb_proj.weight", "down.0.downsample.conv.weight",
                "down.1.attn.1.norm.weight", "mid.block_1.norm1.weight", "mid.attn_1.proj_out.bias",
                "mid.block_2.conv1.weight", "up.0.block.2.nin_shortcut.weight", "up.1.attn.2.q.weight",
                "up.1.upsample.conv.weight", "norm_out.weight", "conv_out.bias"):
        assert key in ref, key
    assert ref["up.1.attn.2.q.weight"].shape == (64, 64, 1, 1)
    assert ref["down.1.attn.0.proj_out.weight"].shape == (64, 64, 1, 1)
    assert ref["up.0.block.0.conv1.weight"].shape[0] == 32  # up.{i} is indexed by resolution level
    assert "up.0.upsample.conv.weight" not in ref and "down.1.downsample.conv.weight" not in ref
    # saved as the DDIM repo's DataParallel model does, with a "module." prefix
    path = tmp_path / "model-790000.ckpt"
    torch.save({f"module.{k}": v for k, v in ref.items()}, path)
    back = load_unet(path, config=SMALL)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x, t = inputs(SMALL, batch=2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t), ours(x, t), rtol=0, atol=0)
    # ddim's training checkpoint ckpt.pth, [model, optimizer, epoch, step, ema]: pick the EMA yourself
    torch.save([ref, {}, 1, 2, ref], tmp_path / "ckpt.pth")
    ema = unet_from_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True)[-1], SMALL)
    assert torch.equal(ema.mid.attn_1.q.weight, ours.mid.attn_1.q.weight)
    # our own layout reads the same way, from a safetensors file
    safetensors_torch.save_file(ours.state_dict(), str(tmp_path / "ours.safetensors"))
    assert torch.equal(load_unet(tmp_path / "ours.safetensors", config=SMALL).conv_out.weight, ours.conv_out.weight)


# --- (d) bad checkpoints ------------------------------------------------------------------------

def broken_copy(folder, tmp_path, edit):
    tensors = safetensors_torch.load_file(str(folder / WEIGHTS))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(tmp_path / WEIGHTS))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    return tmp_path


def test_missing_unexpected_and_misshapen_keys_are_listed(small_folder, tmp_path):
    _, folder = small_folder

    def edit(t):
        del t["mid_block.attentions.0.to_k.bias"]
        t["extra.weight"] = torch.zeros(3)
        t["conv_in.weight"] = torch.zeros(32, 3, 5, 5)

    with pytest.raises(CheckpointError) as info:
        load_unet(broken_copy(folder, tmp_path, edit))
    msg = str(info.value)
    assert "missing keys (1): mid_block.attentions.0.to_k.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "shape mismatches (1): conv_in.weight: checkpoint (32, 3, 5, 5) vs model (32, 3, 3, 3)" in msg
    assert WEIGHTS in msg


def test_wrong_config_for_a_file_is_refused(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(to_reference_state_dict(UNet(SMALL).state_dict()), path)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*shape mismatches.*config="):
        load_unet(path)  # the default CIFAR-10 config does not fit


def test_corrupt_files(small_folder, tmp_path):
    _, folder = small_folder
    data = (folder / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])  # a truncated download
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_unet(tmp_path)
    garbage = tmp_path / "model.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot be read: it is truncated or corrupt, or not a torch file"):
        load_unet(garbage)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_unet(tmp_path)


class NotATensor:
    pass


def test_pickled_objects_and_training_checkpoints_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"conv_in.weight": NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"pickles test_unet\.NotATensor, not only tensors") as info:
        load_unet(path)
    assert "weights_only=False" not in str(info.value)  # torch's advice to unpickle anyway is not passed on
    torch.save([{"conv_in.weight": torch.zeros(1)}, {}, 0, 0], path)  # ddim's ckpt.pth: [model, optimizer, epoch, step]
    with pytest.raises(CheckpointError, match=r"ckpt\.pth"):
        load_unet(path)


def test_unsupported_diffusers_settings_are_named(tmp_path):
    cfg = dict(PUBLISHED_CONFIG, downsample_padding=1, act_fn="gelu")
    with pytest.raises(CheckpointError, match=r"downsample_padding=1.*act_fn='gelu'|act_fn='gelu'.*downsample_padding=1"):
        config_from_diffusers(cfg)
    with pytest.raises(CheckpointError, match="up_block_types"):
        config_from_diffusers(dict(PUBLISHED_CONFIG, up_block_types=["UpBlock2D"] * 4))


def test_missing_folder_and_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))  # not this machine's cache
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_unet(tmp_path / "nope" / "model.ckpt")
    with pytest.raises(FileNotFoundError) as info:
        load_unet("google/ddpm-cifar10-32")
    msg = str(info.value)
    for needed in ("config.json", WEIGHTS, "https://huggingface.co/google/ddpm-cifar10-32", "download=True",
                   str(tmp_path / "google" / "ddpm-cifar10-32")):
        assert needed in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_unet(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_unet(tmp_path / "empty")


def test_download_only_when_asked(small_folder, tmp_path, monkeypatch):
    """download=True goes through huggingface_hub.snapshot_download (faked here: no network in tests)."""
    reference, folder = small_folder
    calls = []

    def snapshot_download(repo_id, allow_patterns, cache_dir, local_files_only=False):
        if local_files_only:  # as an empty cache answers
            raise FileNotFoundError("not in the cache")
        calls.append((repo_id, allow_patterns, cache_dir))
        return str(folder)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    model = load_unet("someone/small-ddpm", download=True, cache_dir=tmp_path)
    assert calls == [("someone/small-ddpm", ["config.json", WEIGHTS, "unet/config.json", f"unet/{WEIGHTS}"], tmp_path)]
    assert torch.equal(model.conv_in.weight, reference.conv_in.weight)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ImportError, match="huggingface_hub"):
        load_unet("someone/small-ddpm", download=True)


def test_hub_name_found_in_the_hugging_face_cache(small_folder, tmp_path, monkeypatch):
    """A repo id that an earlier download put in the Hub cache loads offline without download=True.

    The cache is written in its real layout (``models--<org>--<name>/refs/main`` naming a folder under
    ``snapshots/``) and read by huggingface_hub itself, with ``cache_dir`` given and by default.
    """
    hub = pytest.importorskip("huggingface_hub")
    reference, folder = small_folder
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--small-ddpm"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("config.json", WEIGHTS):
        (repo / "snapshots" / commit / name).write_bytes((folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.chdir(tmp_path)  # no folder named like the repo here
    assert find_cached("someone/small-ddpm", tmp_path / "hub") == repo / "snapshots" / commit
    assert find_cached("someone/other-ddpm", tmp_path / "hub") is None
    model = load_unet("someone/small-ddpm", cache_dir=tmp_path / "hub")
    assert torch.equal(model.conv_in.weight, reference.conv_in.weight)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # what $HF_HUB_CACHE sets
    assert torch.equal(load_unet("someone/small-ddpm").conv_in.weight, reference.conv_in.weight)
    with pytest.raises(FileNotFoundError, match="nor in the Hugging Face cache"):
        load_unet("someone/other-ddpm")


# --- (e) the model contract on a small config ---------------------------------------------------

def test_small_unet_forward_backward_and_contract():
    torch.manual_seed(0)
    model = UNet(SMALL)
    x, t = inputs(SMALL, batch=4, seed=4)
    eps = model(x, t)
    assert eps.shape == x.shape and eps.dtype == torch.float32
    eps.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.temb.dense[0].weight.grad.abs().sum() > 0  # t reaches the output
    model.eval()
    with torch.no_grad():
        # a scalar t is used for the whole batch; rectangular inputs work (convolutions)
        torch.testing.assert_close(model(x, torch.tensor(17.0)), model(x, torch.full((4,), 17.0)))
        assert model(torch.randn(1, 3, 16, 24), torch.tensor([5.0])).shape == (1, 3, 16, 24)
        # float64 states (as the samplers keep them) get float64 ε from the float32 network
        eps64 = model(x.double(), t.double())
        assert eps64.dtype == torch.float64
        torch.testing.assert_close(eps64, model(x, t).double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, H, W\]"):
        model(torch.randn(2, 3, 15, 16), torch.zeros(2))
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(3))


def test_small_unet_drives_the_ddim_sampler(sched):
    from ddim_edu.solvers import sample

    model = UNet(SMALL).eval()
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        x0 = sample(model, x_T, sched, sched.timesteps(4, "uniform"), eta=0.0)
    assert x0.shape == x_T.shape and x0.dtype == torch.float64 and bool(torch.isfinite(x0).all())


def test_config_validation():
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig(attention_resolutions=(12,))
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(base_channels=48)
    with pytest.raises(ValueError, match="image_size"):
        UNetConfig(image_size=20)
    assert UNetConfig(channel_mult=[1, 2]).channel_mult == (1, 2)
