"""Checks for the warm-up: LayerNorm.backward (minipar/ops/fused.py), on one process.

The oracle is the central difference (f(x + h e_i) − f(x − h e_i)) / 2h of the forward
pass, which the exercise does not touch, reduced with fixed random weights so that every
element of the output's gradient matters (``minipar.gradcheck``).
"""
from minipar.course.checking import Check, CheckFailure, compare


def _layer_norm_gradients(shape, seed):
    from minipar.backend import host_rng, set_default_dtype, to_host, xp
    from minipar.gradcheck import numerical_gradient
    from minipar.ops.fused import LayerNorm
    from minipar.tensor import Tensor

    set_default_dtype(xp.float64)
    rng = host_rng(seed)
    width = shape[-1]
    arrays = [xp.asarray(rng.standard_normal(shape)), xp.asarray(1.0 + 0.5 * rng.standard_normal(width)),
              xp.asarray(rng.standard_normal(width))]
    weights = xp.asarray(rng.standard_normal(shape))

    def loss(x, weight, bias):
        return (LayerNorm.apply(Tensor(x), Tensor(weight), Tensor(bias)).data * weights).sum()

    tensors = [Tensor(array.copy(), requires_grad=True) for array in arrays]
    (LayerNorm.apply(*tensors) * Tensor(weights)).sum().backward()
    for index, name in enumerate(("x", "weight", "bias")):
        expected = numerical_gradient(loss, arrays, index)
        got = tensors[index].grad
        if got is None:
            raise CheckFailure(f"dL/d{name}: LayerNorm.backward returned None for {name}")
        compare(f"dL/d{name} for x of shape {shape}, element", to_host(got), to_host(expected),
                "central difference of the forward pass", rtol=1e-6, atol=1e-7)


def check_small(comm):
    _layer_norm_gradients((3, 5), seed=1)


def check_batched(comm):
    _layer_norm_gradients((2, 3, 4), seed=2)


CHECKS = [
    Check("layer_norm backward, x (3, 5)", (1,), check_small),
    Check("layer_norm backward, x (2, 3, 4)", (1,), check_batched),
]
