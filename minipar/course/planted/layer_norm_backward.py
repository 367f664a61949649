"""The corpus of exercise layer_norm_backward (Warm-up: the backward of layer normalisation (one process)): wrong
solutions that its checks must fail with the words of ``expect``, and correct alternatives they must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import FUSED, Planted

WRONG = (
    Planted("layer_norm_backward", "g_hat without the weight", FUSED,
            "g_hat = grad * weight", "g_hat = grad", "dL/dx"),
    Planted("layer_norm_backward", "grad_weight summed without x_hat", FUSED,
            "grad_weight = (rows * x_hat.reshape(rows.shape)).sum(axis=0)", "grad_weight = rows.sum(axis=0)",
            "dL/dweight"),
    Planted("layer_norm_backward", "the mean(g_hat) term dropped", FUSED,
            "(g_hat - g_hat.mean(axis=-1, keepdims=True)\n", "(g_hat\n", "dL/dx"),
    Planted("layer_norm_backward", "near miss: dL/dx off by 1e-9 relative", FUSED,
            "        return grad_x, grad_weight, grad_bias\n",
            "        return grad_x * (1 + 1e-9), grad_weight, grad_bias\n", "autograd through the layer norm"),
    Planted("layer_norm_backward", "the x_hat term averaged over the whole batch, not per row", FUSED,
            "- x_hat * (g_hat * x_hat).mean(axis=-1, keepdims=True))", "- x_hat * (g_hat * x_hat).mean())",
            "dL/dx for x of shape"),
    Planted("layer_norm_backward", "means taken in float64 for precision (a float32 dL/dx comes back float64)", FUSED,
            "        grad_x = inverse_std * (g_hat - g_hat.mean(axis=-1, keepdims=True)\n",
            "        grad_x = inverse_std * (g_hat - g_hat.mean(axis=-1, keepdims=True, dtype='float64')\n",
            "as float64 for float32 inputs"),
)

ALTERNATIVES = (
    Planted("layer_norm_backward", "dL/dx from the mean of the upstream gradient and x_hat, written out", FUSED,
            "        g_hat = grad * weight\n        grad_x = inverse_std * (g_hat - g_hat.mean(axis=-1, keepdims=True)\n"
            "                                - x_hat * (g_hat * x_hat).mean(axis=-1, keepdims=True))\n",
            "        g_hat = grad * weight\n        width = g_hat.shape[-1]\n"
            "        grad_x = (inverse_std / width) * (width * g_hat - g_hat.sum(axis=-1, keepdims=True)\n"
            "                                          - x_hat * (g_hat * x_hat).sum(axis=-1, keepdims=True))\n", ""),
    Planted("layer_norm_backward", "weight and bias gradients summed over every axis but the last", FUSED,
            "        grad_weight = (rows * x_hat.reshape(rows.shape)).sum(axis=0)\n        grad_bias = rows.sum(axis=0)\n",
            "        axes = tuple(range(grad.ndim - 1))\n        grad_weight = (grad * x_hat).sum(axis=axes)\n"
            "        grad_bias = grad.sum(axis=axes)\n", ""),
)
