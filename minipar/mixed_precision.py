"""Mixed-precision training: 16-bit compute on fp32 master weights (``--precision bf16|fp16``).

Micikevicius et al. 2018, "Mixed Precision Training"; the memory it implies is ZeRO's $(2 + 2 + 12)Ψ$
(Rajbhandari et al. 2020, section 3.1). Who holds what, per rank, for the tensors it updates:

    working weights    16-bit   what forward and backward read: round(master) after every step
    gradients          16-bit   each op's gradient rounded; summed over micro-batches in 16-bit
    master weights     fp32     owned here, on the optimizer's side: AdamW updates them
    AdamW's m and v    fp32

One step (the Trainer calls these, in this order):

    computing()            forward and backward with every op's output rounded to 16 bits
                           (tensor.rounding_to); fp16: the loss multiplied by the scale S first
    finish_gradient_sync() after the dp average and the other partial sums (computed in fp32 from
                           16-bit gradients), round each averaged gradient once to 16 bits
    gradients_finite()     fp16: g <- g / S in place, any inf/NaN on any rank -> every rank skips
                           the step (one allreduce of one flag over the world, which holds every
                           group: dp, tp, pp, cp, ep); S halves, or doubles after 2,000 clean steps
    <clip by the global norm, in float64 (grad_norm_squared)>
    step(optimizer)        AdamW on the fp32 masters, reading the gradient in fp32; then the
                           working copies <- round(master); ZeRO 1-2's all-gather follows as usual

The fp32 islands: inside an op the arithmetic is fp32 and only its output is rounded, so the
statistics of a fused op are fp32: softmax's max and sum of exponentials (ops/fused.py Softmax,
ops/attention.py CausalAttention), layer norm's mean and variance (LayerNorm); the loss is not rounded at all
(CrossEntropy and VocabParallelCrossEntropy: ``rounds_output = False``); the gradient norm is
summed in float64 from the 16-bit gradients (optim.grad_norm_squared).

Storage. NumPy has float16 but no bfloat16, and minipar's ops, buckets and ZeRO parts are all of
one dtype, so a 16-bit number lives in a float32 array holding a value of the format: fp16 by
NumPy's float16 cast, bf16 by rounding the fp32 bit pattern to nearest even (precision.round_to_format,
the codec of the 16-bit gradient exchange). Products of two 16-bit numbers are exact in fp32 and
sgemm accumulates in fp32, so a matmul of rounded inputs rounded once at the end is what a GPU's
tensor cores give. ``memory_report`` counts those arrays at 2 bytes per element (what they need),
and says what the process really holds (``storage_bytes``).
"""
from contextlib import contextmanager

import numpy as _host  # errstate only: NumPy's floating-point warnings

from minipar.backend import xp
from minipar.errors import ConfigError
from minipar.parallel.gradient_sync import bytes_held
from minipar.parallel.zero import Zero
from minipar.precision import PRECISIONS, DynamicLossScaler, round_to_format
from minipar.tensor import rounding_to

FORMAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
WORKING_KEYS = ("parameters", "gradients", "peak_full_gradients", "peak_gathered_parameters",
                "data_parallel_buckets")  # memory_report entries that hold 16-bit numbers


def check_precision_options(config):
    """TrainConfig's checks of ``precision`` (every rank, before any work)."""
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if config.precision == "fp32":
        return
    if config.dtype != "float32":
        raise ConfigError(f"precision {config.precision} keeps fp32 master weights and stores its 16-bit numbers "
                          f"in float32 arrays, so it needs dtype float32, got {config.dtype}")
    for name, on in (("compress", config.compress != "none"), ("local_sgd", config.local_sgd > 0)):
        if on:
            raise ConfigError(f"precision {config.precision} with {name}: both change what the gradients or "
                              f"parameters are between ranks; choose one")


def rounding(precision):
    """array -> the nearest number of ``precision``, in the array's own dtype (float32 storage)."""
    def round_array(array):  # (the bf16 codec returns at least 1-d: keep a 0-d loss 0-d)
        return round_to_format(array, precision).astype(array.dtype, copy=False).reshape(array.shape)
    return round_array


class MixedPrecision:
    """The 16-bit side of a Trainer (module docstring); with ``precision="fp32"`` every call is a no-op."""

    def __init__(self, precision, sync, executor, world):
        self.precision, self.sync, self.executor = precision, sync, executor
        self.enabled = precision != "fp32"
        self.round = rounding(precision) if self.enabled else None
        self.loss_scale = executor.loss_scale  # the layout's own factor (cp, ep); fp16 multiplies S in
        self.scaler = DynamicLossScaler(world) if precision == "fp16" else None
        self.updated = list(sync.updated) if self.enabled else []
        self.masters = [t.data.astype(xp.float32, copy=True) for t in self.updated]  # fp32, this rank's parts
        self.master_of = {id(t): master for t, master in zip(self.updated, self.masters, strict=True)}
        self.skipped_steps = 0
        self._round_working_copies()

    @property
    def scale(self):
        """The loss scale S of the next step (1 without fp16)."""
        return float(self.scaler.scale) if self.scaler else 1.0

    def _round_working_copies(self):
        """Working copies <- round(what they hold): the updated tensors, and under ZeRO 1-2 and plain
        dp the whole parameters (ZeRO 3's are gathered from the rounded parts)."""
        if not self.enabled:
            return
        for t in self.updated:
            t.data[...] = self.round(t.data)
        if not (isinstance(self.sync, Zero) and self.sync.stage == 3):
            for p in self.sync.parameters:
                p.data[...] = self.round(p.data)

    # ---- one step ----------------------------------------------------------------------
    @contextmanager
    def computing(self):
        """Forward and backward in 16 bits; under fp16 the loss is scaled by S."""
        if not self.enabled:
            yield
            return
        self.executor.loss_scale = self.loss_scale * self.scale
        # fp16 overflows to inf on purpose (the scaler then skips the step): no warning per op
        with rounding_to(self.round), _host.errstate(over="ignore", invalid="ignore"):
            yield

    def finish_gradient_sync(self):
        """The averaged gradients, stored in 16 bits (the sums ran in fp32 from 16-bit inputs)."""
        for t in self.updated:
            if t.grad is not None:
                t.grad[...] = self.round(t.grad)

    def gradients_finite(self):
        """fp16: unscale in place and agree over the world whether to step (GradScaler's rules)."""
        if self.scaler is None:
            return True
        finite = self.scaler.unscale_and_check([t.grad for t in self.updated if t.grad is not None])
        self.scaler.update()
        self.skipped_steps += not finite
        return finite

    def step(self, optimizer):
        """The optimizer on the fp32 masters (which read the gradient in fp32), then round them into
        the working copies. The optimizer's state stays keyed by the updated tensors."""
        if not self.enabled:
            optimizer.step()
            return
        working = [t.data for t in self.updated]
        for t, master in zip(self.updated, self.masters, strict=True):
            t.data = master
        try:
            optimizer.step()
        finally:
            for t, array, master in zip(self.updated, working, self.masters, strict=True):
                t.data = array
                array[...] = self.round(master)

    # ---- state: checkpoints see the masters, memory reports the formats ----------------------
    def state_view(self, sync_state):
        """``sync_state`` with the members that must know about the masters replaced."""
        if not self.enabled:
            return sync_state
        inner = {name: getattr(sync_state, name) for name in ("parameter_arrays", "load_parameter",
                                                               "memory_report", "state_arrays", "load_state_arrays")}
        sync_state.parameter_arrays = lambda: self._master_arrays(inner["parameter_arrays"])
        sync_state.load_parameter = lambda p, array: self._load_parameter(inner["load_parameter"], p, array)
        sync_state.memory_report = lambda optimizer: self.memory_report(inner["memory_report"](optimizer))
        sync_state.state_arrays = lambda optimizer: {**inner["state_arrays"](optimizer),
                                                     **self._scaler_arrays(optimizer)}
        sync_state.load_state_arrays = lambda arrays, optimizer: inner["load_state_arrays"](
            self._load_scaler_arrays(arrays, optimizer), optimizer)
        return sync_state

    def _master_arrays(self, parameter_arrays):
        """{id(p): full-precision array}: the masters written into the working storage, read (ZeRO 1-2
        all-gather them first; collective there, as under ZeRO 3), then rounded back."""
        for t, master in zip(self.updated, self.masters, strict=True):
            t.data[...] = master
        if isinstance(self.sync, Zero) and self.sync.stage < 3:
            self.sync.after_optimizer_step(None)  # the all-gather of the parts into whole parameters
        try:
            return parameter_arrays()
        finally:
            self._round_working_copies()

    def _load_parameter(self, load, parameter, array):
        load(parameter, array)
        t = self.sync.updated_tensor(parameter)
        self.master_of[id(t)][...] = t.data
        t.data[...] = self.round(t.data)
        if not (isinstance(self.sync, Zero) and self.sync.stage == 3):
            parameter.data[...] = self.round(parameter.data)

    def _scaler_arrays(self, optimizer):
        """fp16: S, the clean run, and AdamW's step count (skipped steps did not advance it, so it is
        not the checkpoint's step)."""
        if self.scaler is None:
            return {}
        state = [float(self.scaler.scale), self.scaler.clean_steps, optimizer.step_count]
        return {"loss_scale": xp.asarray(state, dtype=xp.float64)}

    def _load_scaler_arrays(self, arrays, optimizer):
        arrays = dict(arrays)
        saved = arrays.pop("loss_scale", None)
        if saved is not None and self.scaler is not None:
            scale, clean_steps, optimizer_steps = (float(v) for v in saved)
            self.scaler.load_state({"scale": scale, "clean_steps": int(clean_steps)})
            optimizer.step_count = int(optimizer_steps)
        return arrays

    def memory_report(self, report):
        """The sync's report with 16-bit arrays at 2 bytes per element and the fp32 masters added to
        the optimizer's state: $(2 + 2 + 12)Ψ$ per replica, ZeRO's table under ZeRO (docs/mixed_precision.md).
        ``storage_bytes``: what this process really holds (its 16-bit numbers sit in float32 arrays)."""
        width = FORMAT_BYTES[self.precision]
        out = {key: value * width // 4 if key in WORKING_KEYS else value for key, value in report.items()}
        out["master_weights"] = bytes_held(self.masters)
        out["optimizer_states"] = report["optimizer_states"] + out["master_weights"]
        out["total"] = out["parameters"] + out["gradients"] + out["optimizer_states"]
        out["storage_bytes"] = report["total"] + out["master_weights"]
        return out
