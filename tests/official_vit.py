"""An independent re-implementation of the official RLRR ViT (zstarN70/RLRR, models/networks.py),
for conversion tests only.

Module names reproduce the official checkpoint keys (docs/method.md, section 5); weights are read straight
from a Google .npz with numpy, not through timm; each linear builds W' = W * scale_col * scale_line + W
on every call as the official code does. Eval-mode forward only (its drop path is a no-op in eval).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialRLRRLinear(nn.Module):
    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(np.ascontiguousarray(weight)))
        self.register_buffer("bias", torch.from_numpy(np.ascontiguousarray(bias)))
        out_f, in_f = self.weight.shape
        self.scale_col = nn.Parameter(torch.empty(1, in_f))
        self.scale_line = nn.Parameter(torch.empty(out_f, 1))
        self.shift_bias = nn.Parameter(torch.zeros(1, out_f))
        nn.init.kaiming_uniform_(self.scale_col)
        nn.init.kaiming_uniform_(self.scale_line)

    def forward(self, x):
        w = self.weight * self.scale_col * self.scale_line + self.weight
        return F.linear(x, w) + (self.bias + self.shift_bias)


def _ssf(obj: nn.Module, name: str, dim: int) -> None:
    setattr(obj, f"ssf_scale_{name}", nn.Parameter(torch.ones(dim) + 0.02 * torch.randn(dim)))
    setattr(obj, f"ssf_shift_{name}", nn.Parameter(0.02 * torch.randn(dim)))


def _ln(w, prefix, dim):
    ln = nn.LayerNorm(dim, eps=1e-6)
    ln.weight.data = torch.from_numpy(w[prefix + "/scale"].copy())
    ln.bias.data = torch.from_numpy(w[prefix + "/bias"].copy())
    return ln


class Attention(nn.Module):
    def __init__(self, w, p, heads):
        super().__init__()
        self.heads = heads
        for name in ("query", "key", "value"):
            k = w[f"{p}/{name}/kernel"]
            setattr(self, name, OfficialRLRRLinear(k.reshape(k.shape[0], -1).T, w[f"{p}/{name}/bias"].reshape(-1)))
        k = w[f"{p}/out/kernel"]
        self.out = OfficialRLRRLinear(k.reshape(-1, k.shape[-1]).T, w[f"{p}/out/bias"])

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, w, i, dim, heads):
        super().__init__()
        p = f"Transformer/encoderblock_{i}"
        self.attention_norm = _ln(w, f"{p}/LayerNorm_0", dim)
        self.ffn_norm = _ln(w, f"{p}/LayerNorm_2", dim)
        self.attn = Attention(w, f"{p}/MultiHeadDotProductAttention_1", heads)
        self.ffn = nn.Module()
        self.ffn.fc1 = OfficialRLRRLinear(w[f"{p}/MlpBlock_3/Dense_0/kernel"].T, w[f"{p}/MlpBlock_3/Dense_0/bias"])
        self.ffn.fc2 = OfficialRLRRLinear(w[f"{p}/MlpBlock_3/Dense_1/kernel"].T, w[f"{p}/MlpBlock_3/Dense_1/bias"])
        _ssf(self, "attn_norm", dim)
        _ssf(self, "ffn_norm", dim)

    def forward(self, x):
        h = self.attention_norm(x) * self.ssf_scale_attn_norm + self.ssf_shift_attn_norm
        x = x + self.attn(h)
        h = self.ffn_norm(x) * self.ssf_scale_ffn_norm + self.ssf_shift_ffn_norm
        return x + self.ffn.fc2(F.gelu(self.ffn.fc1(h)))


class OfficialViT(nn.Module):
    def __init__(self, npz_path: str, num_classes: int, heads: int):
        super().__init__()
        w = np.load(npz_path, allow_pickle=False)
        kernel = w["embedding/kernel"]  # (kh, kw, in, out)
        dim, patch = kernel.shape[-1], kernel.shape[0]
        depth = sum(1 for k in w.files if k.endswith("/LayerNorm_0/scale") and "encoderblock_" in k)
        self.transformer = nn.Module()
        emb = self.transformer.embeddings = nn.Module()
        emb.patch_embeddings = nn.Conv2d(kernel.shape[2], dim, patch, stride=patch)
        emb.patch_embeddings.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        emb.patch_embeddings.bias.data = torch.from_numpy(w["embedding/bias"].copy())
        emb.cls_token = nn.Parameter(torch.from_numpy(w["cls"].copy()))
        emb.position_embeddings = nn.Parameter(torch.from_numpy(w["Transformer/posembed_input/pos_embedding"].copy()))
        _ssf(emb, "patch", dim)
        enc = self.transformer.encoder = nn.Module()
        enc.layer = nn.ModuleList(Block(w, i, dim, heads) for i in range(depth))
        enc.encoder_norm = _ln(w, "Transformer/encoder_norm", dim)
        _ssf(enc, "enc_norm", dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        emb, enc = self.transformer.embeddings, self.transformer.encoder
        x = emb.patch_embeddings(x).flatten(2).transpose(1, 2)
        x = x * emb.ssf_scale_patch + emb.ssf_shift_patch
        x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + emb.position_embeddings
        for blk in enc.layer:
            x = blk(x)
        x = enc.encoder_norm(x) * enc.ssf_scale_enc_norm + enc.ssf_shift_enc_norm
        return self.head(x[:, 0])

    def official_checkpoint(self) -> dict:
        """What the official training script saves: tensors whose names contain head/scale/shift."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if any(s in k for s in ("head", "scale", "shift"))}
