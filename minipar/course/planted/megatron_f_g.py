"""The corpus of exercise megatron_f_g (Megatron's f and g, and the column- and row-parallel linear forward):
wrong solutions that its checks must fail with the words of ``expect``, and correct alternatives they must
pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import TP_COMM, TP_LAYERS, Planted, region

WRONG = (
    Planted("megatron_f_g", "f's backward is the identity (f and g mixed up)", TP_COMM,
            "        return allreduce_sum(grad, ctx.communicator)\n", "        return grad\n",
            "f's backward sums dL/dy over the tensor-parallel ranks"),
    Planted("megatron_f_g", "the row-parallel bias added on every rank before g", TP_LAYERS,
            "out = self.region.leave(ops.linear(x, self.weight))\n"
            "        return out + self.bias if self.bias is not None else out",
            "return self.region.leave(ops.linear(x, self.weight, self.bias))", "the bias added once after the sum"),
    Planted("megatron_f_g", "the column-parallel layer without f", TP_LAYERS,
            "        x = self.region.enter(x)\n", "",
            "dL/dx through both layers"),
    region("megatron_f_g", "the row-parallel bias on rank 0 only (other ranks' bias gradients lost)", TP_LAYERS,
           {"RowParallelLinear.forward": """
partial = ops.linear(x, self.weight, self.bias if self.region.communicator.rank == 0 else None)
return self.region.leave(partial)
"""}, "the row-parallel bias"),
    Planted("megatron_f_g", "g's backward sums too (an allreduce both ways)", TP_COMM,
            "    def backward(ctx, grad):\n        ### BEGIN SOLUTION\n        return grad\n",
            "    def backward(ctx, grad):\n        ### BEGIN SOLUTION\n        return allreduce_sum(grad, ctx.communicator)\n",
            "g's backward is the identity",
            more=(("        return allreduce_sum(partial, communicator)\n",
                   "        ctx.communicator = communicator\n        return allreduce_sum(partial, communicator)\n"),)),
    Planted("megatron_f_g", "near miss: g's sum off by 1e-9 relative", TP_COMM,
            "        return allreduce_sum(partial, communicator)\n",
            "        return allreduce_sum(partial, communicator) * (1 + 1e-9)\n", "g forward, z"),
)

ALTERNATIVES = (
    Planted("megatron_f_g", "f and g through the communicator's allreduce on a copy", TP_COMM,
            "        return allreduce_sum(grad, ctx.communicator)\n",
            "        total = xp.ascontiguousarray(grad).copy()\n        ctx.communicator.allreduce(total)\n"
            "        return total\n", "",
            more=(("        return allreduce_sum(partial, communicator)\n",
                   "        total = xp.ascontiguousarray(partial).copy()\n        communicator.allreduce(total)\n"
                   "        return total\n"),)),
    region("megatron_f_g", "the biases added after the matmul, in the other order", TP_LAYERS, {
        "ColumnParallelLinear.forward": """
y = ops.linear(self.region.enter(x), self.weight)
return y if self.bias is None else y + self.bias
""",
        "RowParallelLinear.forward": """
out = self.region.leave(ops.linear(x, self.weight))
if self.bias is None:
    return out
return self.bias + out
"""}, ""),
)
