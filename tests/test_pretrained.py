"""Loading pre-trained backbones from local files: Google .npz, timm .safetensors/.pth, microsoft Swin .pth."""
import re

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from rlrr import CheckpointError, create_model, load_pretrained

from helpers import vit_to_google_npz


def _backbone_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head")}


def _assert_backbone_equal(plain, adapted):
    """The adapted model's frozen tensors equal the plain model's (adapter params aside)."""
    adapted_state = {re.sub(r"\.base\.", ".", k): v for k, v in adapted.state_dict().items()}
    for k, v in _backbone_state(plain).items():
        torch.testing.assert_close(adapted_state[k], v, msg=k)


def test_google_npz_loads_into_vit(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("test_vit", num_classes=0)
    path = str(tmp_path / "ViT-test.npz")
    vit_to_google_npz(src, path)
    model = create_model("test_vit", num_classes=10, pretrained=path)
    _assert_backbone_equal(src, model)
    assert torch.count_nonzero(model.head.weight) == 0  # the 21k head of the file is not used


def test_npz_position_embedding_is_resampled_for_another_image_size(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("test_vit", num_classes=0)  # 224 px: 14x14 grid
    path = str(tmp_path / "ViT-test.npz")
    vit_to_google_npz(src, path)
    model = create_model("test_vit", num_classes=2, pretrained=path, img_size=128)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 64)
    torch.testing.assert_close(model.pos_embed[:, :1], src.pos_embed[:, :1])  # class position kept
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 2)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_files_load(tmp_path, suffix):
    torch.manual_seed(1)
    src = timm.create_model("test_vit", num_classes=1000)
    path = str(tmp_path / f"w{suffix}")
    if suffix == ".safetensors":
        save_file(src.state_dict(), path)
    else:
        torch.save({"state_dict": src.state_dict(), "epoch": 3}, path)
    model = create_model("test_vit", num_classes=5, pretrained=path)
    _assert_backbone_equal(src, model)


def test_timm_safetensors_resampled_to_another_image_size(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model("test_vit", num_classes=0)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_model("test_vit", num_classes=5, pretrained=str(tmp_path / "w.safetensors"), img_size=96)
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 64)


def _microsoft_swin_layout(state):
    """timm Swin keys -> the original microsoft layout (downsample at the end of a stage, 'head.')."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


def test_microsoft_swin_pth_with_model_key(tmp_path):
    torch.manual_seed(2)
    src = timm.create_model("swin_tiny_patch4_window7_224", num_classes=21841)
    path = str(tmp_path / "swin_tiny_patch4_window7_224_22k.pth")
    torch.save({"model": _microsoft_swin_layout(src.state_dict())}, path)
    model = create_model("swin_tiny_patch4_window7_224", num_classes=100, pretrained=path)
    _assert_backbone_equal(src, model)
    assert torch.count_nonzero(model.head.fc.weight) == 0


def test_missing_unknown_and_mismatched_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"pre-trained file not found: .*nope\.npz"):
        create_model("test_vit", num_classes=2, pretrained=str(tmp_path / "nope.npz"))
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"w\.ckpt: unknown checkpoint format; expected one of \.npz"):
        create_model("test_vit", num_classes=2, pretrained=str(tmp_path / "w.ckpt"))
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"bad\.pth: cannot read"):
        create_model("test_vit", num_classes=2, pretrained=str(tmp_path / "bad.pth"))

    small = timm.create_model("test_vit", num_classes=0, embed_dim=32)
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(CheckpointError) as e:
        create_model("test_vit", num_classes=2, pretrained=str(tmp_path / "small.safetensors"))
    msg = str(e.value)
    assert "small.safetensors does not fit test_vit: shape mismatch: cls_token (1, 1, 32) vs model (1, 1, 64)" in msg
    assert "(" in msg and "in all)" in msg and "\n" not in msg

    vit_to_google_npz(timm.create_model("test_vit", num_classes=0, depth=4), str(tmp_path / "d4.npz"))
    with pytest.raises(CheckpointError, match=r"d4\.npz does not fit test_vit: shape mismatch: depth 4 vs model 6"):
        create_model("test_vit", num_classes=2, pretrained=str(tmp_path / "d4.npz"))
    with pytest.raises(CheckpointError, match=r"\.npz files are Google ViT checkpoints; SwinTransformer"):
        load_pretrained(timm.create_model("swin_tiny_patch4_window7_224"), str(tmp_path / "d4.npz"))
    np.savez(str(tmp_path / "other.npz"), a=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"other\.npz: not a Google vision_transformer checkpoint"):
        create_model("test_vit", num_classes=2, pretrained=str(tmp_path / "other.npz"))

    sd = timm.create_model("test_vit", num_classes=0).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["blocks.0.norm1.weight"]
    save_file(sd, str(tmp_path / "keys.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.0\.norm1\.weight; unexpected: extra\.weight"):
        create_model("test_vit", num_classes=2, pretrained=str(tmp_path / "keys.safetensors"))
