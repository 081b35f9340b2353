"""The RLRR layers (Dong et al., CVPR 2024), one file each, each with its exact ``merged()``.

linear.py    RLRRLinear:  W' = W * (1 + s_out s_in^T),  b' = b + f   (docs/method.md, section 1)
fused.py     its Triton kernels on CUDA (one pass for W', one for the scale gradients)
conv.py      RLRRConv2d:  the same on a k x k kernel viewed as an (out*k, in*k) matrix (section 8)
ssf.py       ScaleShift:  y = base(x) * gamma + beta  (SSF after a norm, a linear or the patch conv)
scales.py    what they share: scale shapes and views, initialisation, the form of W' = f(W, D)
variants.py  the options (init, sides, form, kernel, targets) and the one check of how they combine

The ablations of the paper are options of the first two (docs/method.md, section 9): rank r
(S_out: out x r, S_in: r x in), one side only (the other fixed at ones), and the form of the update:
"residual" W * (1 + S_out S_in) (the method), "plain" W * (S_out S_in) (no residual 1) and
"additive" W + S_out S_in (without W).
"""
from .. import lazy_exports

# loaded on first use, so that rlrr.config can read the options (variants.py) without importing torch
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".conv": ["RLRRConv2d"],
    ".linear": ["RescaledLinearFn", "RLRRLinear", "fold_bias_into_preceding_norm", "use_fused"],
    ".scales": ["apply_form", "init_scales", "rescale_dtype", "rescaled_weight", "scale_shapes", "scale_views"],
    ".ssf": ["ScaleShift"],
    ".variants": ["LINEAR_TARGETS", "Form", "Init", "Kernel", "Sides", "check_variant", "variant_problem"],
})
