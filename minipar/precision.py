"""Number formats for mixed-precision training, and dynamic loss scaling.

The three formats (IEEE 754 half, Google's bfloat16, IEEE single), as sign | exponent | mantissa:

    fp32  1 | 8 | 23    max 3.4e38    smallest normal 1.2e-38   eps 2^-23 = 1.2e-7
    bf16  1 | 8 |  7    max 3.4e38    smallest normal 1.2e-38   eps 2^-7  = 7.8e-3
    fp16  1 | 5 | 10    max 65504     smallest normal 6.1e-5    eps 2^-10 = 9.8e-4

bf16 keeps fp32's exponent, so it has fp32's range and loses only precision; fp16 keeps more
precision but overflows above 65504 and flushes small gradients (below ~6e-8, its smallest
subnormal) to zero. That is why fp16 training needs a loss scale and bf16 training does not
(Micikevicius et al. 2018, "Mixed Precision Training"; Kalamkar et al. 2019, "A Study of BFLOAT16
for Deep Learning Training").

NumPy has float16 but no bfloat16, so bf16 is emulated: a value is rounded to nearest even at
bit 16 of its fp32 pattern (``round_to_format``), reusing the codec of the 16-bit gradient
exchange (``minipar/comm/compression.py``), and kept in a float32 array.

Dynamic loss scaling (``DynamicLossScaler``) multiplies the loss by a scale S before backward,
so every gradient is S times larger and small ones survive fp16; the optimizer sees g / S. Its
rules are PyTorch's GradScaler defaults, which we reproduce decision for decision
(tests/test_precision.py replays a sequence recorded once from PyTorch 2.13):

    S starts at 2^16
    any inf or NaN in any gradient on any rank:  skip the optimizer step, S <- S / 2, clean run <- 0
    otherwise:                                   clean run += 1; at 2,000 clean steps S <- 2 S, clean run <- 0
    (a doubling that would overflow fp32 is not made)

Every rank must take the same decision, or the replicas diverge: each rank reduces its own
"found inf" flag with one allreduce (max) of one number over the world, before anyone steps.
"""
import numpy as _host

from minipar.backend import xp
from minipar.comm.compression import bf16_decode, bf16_encode
from minipar.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")

# name -> (exponent bits, mantissa bits): the bit layouts above, for lessons and checks.
BIT_LAYOUTS = {"fp32": (8, 23), "bf16": (8, 7), "fp16": (5, 10)}


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def round_to_format(values, precision):
    """``values`` rounded to the nearest number of ``precision`` (ties to even), as float32.

    fp16 rounds through NumPy's float16 cast (beyond ±65504 that gives ±inf, fp16's range);
    bf16 through the fp32 bit pattern (``bf16_encode``); fp32 is a plain cast.
    """
    check_precision(precision)
    if precision == "fp32":
        return xp.asarray(values, dtype=xp.float32)
    if precision == "fp16":
        with _host.errstate(over="ignore"):
            return xp.asarray(values).astype(xp.float16).astype(xp.float32)
    return bf16_decode(bf16_encode(xp.asarray(values, dtype=xp.float32)), xp.float32)


class DynamicLossScaler:
    """Loss scale S with PyTorch GradScaler's rules (module docstring), agreed over ``communicator``.

    One step, on every rank::

        loss_to_backward = loss * scaler.scale
        ...backward...
        if scaler.unscale_and_check(gradients):   # g <- g / S in place; True if all finite everywhere
            optimizer.step()
        scaler.update()                           # halve on overflow, double after a clean run
    """

    def __init__(self, communicator=None, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise ConfigError("loss scaling needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 "
                              f"and growth_interval >= 1, got {init_scale}, {growth_factor}, {backoff_factor}, "
                              f"{growth_interval}")
        self.communicator = communicator
        self.scale = _host.float32(init_scale)  # fp32, as GradScaler keeps it
        self.growth_factor, self.backoff_factor = _host.float32(growth_factor), _host.float32(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.clean_steps = 0  # GradScaler's "growth tracker"
        self.found_overflow = False  # the last check's agreed decision
        self._flag = xp.zeros(1, dtype=xp.float64)  # preallocated: one number crosses the network per step

    def unscale_and_check(self, gradients):
        """Divide every gradient by S in place; return True if every gradient on every rank is finite.

        The local check is one pass per gradient; the agreement is one allreduce (max) of one flag,
        so a rank that overflowed makes every rank skip (the collective is over the whole world).
        """
        inverse = 1.0 / float(self.scale)
        finite = True
        for gradient in gradients:
            gradient *= inverse
            finite = finite and bool(xp.isfinite(gradient).all())
        self._flag[0] = 0.0 if finite else 1.0
        if self.communicator is not None:
            self.communicator.allreduce(self._flag, op="max")
        self.found_overflow = bool(self._flag[0] > 0)
        return not self.found_overflow

    def update(self):
        """Move S after the step: the rules in the module docstring, in GradScaler's order."""
        if self.found_overflow:
            self.scale = self.scale * self.backoff_factor
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            with _host.errstate(over="ignore"):  # a doubling past fp32's max is refused just below
                grown = self.scale * self.growth_factor
            if _host.isfinite(grown):
                self.scale = grown
            self.clean_steps = 0

    def state(self):
        """What a checkpoint carries to resume the scale exactly."""
        return {"scale": float(self.scale), "clean_steps": self.clean_steps}

    def load_state(self, state):
        self.scale = _host.float32(state["scale"])
        self.clean_steps = int(state["clean_steps"])
