"""Checks for the warm-up: LayerNorm.backward (minipar/ops/fused.py), on one process.

The oracle is the central difference $(f(x + h e_i) − f(x − h e_i)) / 2h$ of the forward
pass, which the exercise does not touch, reduced with fixed random weights so that every
element of the output's gradient matters (``minipar.gradcheck``).
"""
from minipar.course.checking import Check, CheckFailure, compare, require


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
    composed = [Tensor(array.copy(), requires_grad=True) for array in arrays]
    (_composed_layer_norm(*composed) * Tensor(weights)).sum().backward()
    for index, name in enumerate(("x", "weight", "bias")):
        expected = numerical_gradient(loss, arrays, index)
        got = tensors[index].grad
        if got is None:
            raise CheckFailure(f"dL/d{name}: LayerNorm.backward returned None for {name}")
        require(got.dtype == arrays[index].dtype, f"dL/d{name} is {got.dtype}, {name} is {arrays[index].dtype}: "
                                                  "keep the dtype")
        compare(f"dL/d{name} for x of shape {shape}, element", to_host(got), to_host(expected),
                "central difference of the forward pass", rtol=1e-6, atol=1e-7)
        # Tight: the same layer norm built from elementary ops (mean, -, *, **), differentiated by autograd.
        # A formula that is almost right (off by 1e-9) passes the central difference, not this.
        compare(f"dL/d{name} for x of shape {shape}, element", to_host(got), to_host(composed[index].grad),
                "autograd through the layer norm written with elementary ops, to 1e-11", rtol=1e-11, atol=1e-13)


def _composed_layer_norm(x, weight, bias, eps=1e-5):
    centred = x - x.mean(axis=-1, keepdims=True)
    inverse_std = ((centred * centred).mean(axis=-1, keepdims=True) + eps) ** -0.5
    return centred * inverse_std * weight + bias


def check_small(comm):
    _layer_norm_gradients((3, 5), seed=1)


def check_batched(comm):
    _layer_norm_gradients((2, 3, 4), seed=2)


def check_float32(comm):
    """float32 in, float32 out, close to the float64 result."""
    from minipar.backend import host_rng, to_host, xp
    from minipar.ops.fused import LayerNorm
    from minipar.tensor import Tensor

    rng = host_rng(3)
    arrays = [rng.standard_normal((4, 6)), 1.0 + 0.5 * rng.standard_normal(6), rng.standard_normal(6)]
    upstream = rng.standard_normal((4, 6))
    results = {}
    for dtype in (xp.float64, xp.float32):
        tensors = [Tensor(xp.asarray(a, dtype=dtype), requires_grad=True) for a in arrays]
        (LayerNorm.apply(*tensors) * Tensor(xp.asarray(upstream, dtype=dtype))).sum().backward()
        results[dtype] = [t.grad for t in tensors]
    # The engine adds a returned gradient into the float32 .grad, which hides a float64 one: ask backward itself.
    out = LayerNorm.apply(*[Tensor(xp.asarray(a, dtype=xp.float32), requires_grad=True) for a in arrays])
    returned = LayerNorm.backward(out._node, xp.asarray(upstream, dtype=xp.float32))
    for name, array in zip(("x", "weight", "bias"), returned, strict=True):
        require(array is None or array.dtype == xp.float32,
                f"LayerNorm.backward returned dL/d{name} as {array.dtype} for float32 inputs: keep the dtype (a "
                "float64 step, such as mean(..., dtype='float64') or a Python float array, promotes the result; "
                "the engine casts it back into .grad, but the op computes and holds twice the bytes)")
    for name, got, expected in zip(("x", "weight", "bias"), results[xp.float32], results[xp.float64], strict=True):
        require(got is not None and got.dtype == xp.float32,
                f"dL/d{name} is {None if got is None else got.dtype} for float32 inputs: keep the dtype")
        compare(f"dL/d{name}, float32, element", to_host(got), to_host(expected), "the float64 result, to float32's "
                "precision", rtol=1e-4, atol=1e-5)


CHECKS = [
    Check("layer_norm backward, x (3, 5)", (1,), check_small),
    Check("layer_norm backward, x (2, 3, 4)", (1,), check_batched),
    Check("layer_norm backward, float32 kept", (1,), check_float32),
]
