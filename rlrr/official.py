"""Checkpoints written by the official RLRR code (github.com/zstarN70/RLRR) -> our adapter tensors.

The official ViT has separate query/key/value/out layers, each with ``scale_col`` (1, in) = our
s_in, ``scale_line`` (out, 1) = our s_out and ``shift_bias`` (1, out) = our f (docs/method.md, section 5).
On timm's fused qkv the three become the three rows of our (3, in) s_in and the concatenation of the
output-side vectors, which is exactly equivalent.
"""
import re

import torch

_LINEARS = {"attn.out": "attn.proj", "ffn.fc1": "mlp.fc1", "ffn.fc2": "mlp.fc2"}
_NORMS = {"attn_norm": "norm1", "ffn_norm": "norm2"}
_VECTORS = {"scale_col": "scale_in", "scale_line": "scale_out", "shift_bias": "bias_shift"}


def convert_official_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official ViT checkpoint (head/scale/shift tensors) to timm names; unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in state.items():
        t = t.detach().float()
        if key in ("head.weight", "head.bias"):
            out[key] = t
        elif m := re.fullmatch(r"transformer\.embeddings\.ssf_(scale|shift)_patch", key):
            out[f"patch_embed.proj.ssf_{m[1]}"] = t.flatten()
        elif m := re.fullmatch(r"transformer\.encoder\.ssf_(scale|shift)_enc_norm", key):
            out[f"norm.ssf_{m[1]}"] = t.flatten()
        elif m := re.fullmatch(r"transformer\.encoder\.layer\.(\d+)\.ssf_(scale|shift)_(attn_norm|ffn_norm)", key):
            out[f"blocks.{m[1]}.{_NORMS[m[3]]}.ssf_{m[2]}"] = t.flatten()
        elif m := re.fullmatch(r"transformer\.encoder\.layer\.(\d+)\.attn\.(query|key|value)\.(\w+)", key):
            if m[3] not in _VECTORS:
                unknown.append(key)
                continue
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = t
        elif m := re.fullmatch(r"transformer\.encoder\.layer\.(\d+)\.(attn\.out|ffn\.fc1|ffn\.fc2)\.(\w+)", key):
            if m[3] not in _VECTORS:
                unknown.append(key)
                continue
            name = f"blocks.{m[1]}.{_LINEARS[m[2]]}.{_VECTORS[m[3]]}"
            out[name] = t if m[3] == "scale_col" else t.flatten()  # s_in stays (1, in)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an official RLRR ViT checkpoint: unexpected key(s) {unknown[:5]}"
                         + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else ""))
    for (layer, vector), parts in sorted(qkv.items()):
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise ValueError(f"layer {layer}: {vector} of {missing} missing (need query, key and value)")
        chunks = [parts[p] for p in ("query", "key", "value")]
        # scale_col (1, in) x3 -> (3, in); scale_line (out, 1) and shift_bias (1, out) -> (3 out,)
        merged = torch.cat(chunks, 0) if vector == "scale_col" else torch.cat([c.flatten() for c in chunks])
        out[f"blocks.{layer}.attn.qkv.{_VECTORS[vector]}"] = merged
    return out
