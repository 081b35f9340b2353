"""tools/convert_official.py: an official RLRR checkpoint -> our adapter gives the official logits."""
import pytest
import torch

from rlrr import create_model, load_adapter

from helpers import run_tool_here, vit_to_google_npz
from official_vit import OfficialViT

pytestmark = pytest.mark.integration  # the converter as a command


def _convert(*args):
    return run_tool_here("convert_official.py", *args)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A trained-looking official model on a Google-format .npz, and its saved checkpoint."""
    import timm
    tmp = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    npz = str(tmp / "ViT-test.npz")
    vit_to_google_npz(timm.create_model("test_vit", num_classes=0, img_size=64), npz)
    ref = OfficialViT(npz, num_classes=7, heads=2).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if any(s in n for s in ("head", "scale", "shift")):
                p.add_(0.2 * torch.randn_like(p))
    ckpt = str(tmp / "official.pth")
    torch.save(ref.official_checkpoint(), ckpt)
    return ref, npz, ckpt, tmp


def test_converted_adapter_reproduces_official_logits(official):
    ref, npz, ckpt, tmp = official
    out = str(tmp / "adapter.safetensors")
    res = _convert(ckpt, "--model", "test_vit", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "7 classes" in res.stdout
    ours = create_model("test_vit", num_classes=7, pretrained=npz, img_size=64).eval()
    load_adapter(ours, out)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= 1e-4


def test_converter_errors_are_one_line(official, tmp_path):
    _, _, ckpt, _ = official
    res = _convert(ckpt, "--model", "vit_base_patch16_224", "--out", str(tmp_path / "a.safetensors"))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "does not fit vit_base_patch16_224" in res.stderr
    assert "shape of blocks.0.attn.qkv.scale_in: file (3, 64) vs model (3, 768)" in res.stderr
    state = torch.load(ckpt, weights_only=True)
    state["transformer.encoder.layer.0.attn.query.lora_A"] = torch.zeros(1)
    torch.save(state, str(tmp_path / "odd.pth"))
    res = _convert(str(tmp_path / "odd.pth"), "--model", "test_vit", "--out", str(tmp_path / "b.safetensors"))
    assert res.returncode == 2 and "unexpected key(s) ['transformer.encoder.layer.0.attn.query.lora_A']" in res.stderr
    res = _convert(str(tmp_path / "missing.pth"), "--model", "test_vit", "--out", str(tmp_path / "c.safetensors"))
    assert res.returncode == 2 and "missing.pth" in res.stderr
