"""Test helpers: non-trivial adapter values, and Google-format .npz files written from a timm ViT."""
import numpy as np
import torch
import torch.nn as nn


@torch.no_grad()
def randomize_trainable(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Move every trainable tensor away from its initial value (zero head and shifts included)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        p.add_(torch.randn(p.shape, generator=g) * std)


def vit_to_google_npz(model: nn.Module, path: str, head_classes: int = 21843, seed: int = 0) -> None:
    """Write a timm ViT's weights in the layout of Google's vision_transformer .npz files.

    This is the inverse of the layout timm's ``_load_weights`` reads; kernels are (in, out), the
    attention kernels split per head. A head of ``head_classes`` rows (ImageNet-21k) is included as in
    the real files.
    """
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    d = model.embed_dim
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, -1)
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, -1)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, -1, d)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    rng = np.random.default_rng(seed)
    w["head/kernel"] = rng.standard_normal((d, head_classes)).astype(np.float32)
    w["head/bias"] = np.zeros(head_classes, np.float32)
    np.savez(path, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()})
