"""The corpus of exercise zero_1 (ZeRO-1: reduce-scatter the gradients, update the own part, all-gather the
parameters): wrong solutions that its checks must fail with the words of ``expect``, and correct alternatives
they must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import ZERO, Planted, region

_ZERO_BY_ALLREDUCE = """
rows = xp.zeros((self.count, unit.length), dtype=unit.parameters[0].dtype)
for p, place in unit.slots():
    if p.grad is not None:
        rows[:, place] = self._rows(p, p.grad)
    p.grad = None
self.comm.allreduce(rows)
gradient = rows[self.rank] / self.count
for p, place in unit.slots():
    self.parts[id(p)].grad = gradient[place]
unit.sent = True
"""
_ROWS_MADE_ONCE = """
if not hasattr(self, "rows_of_unit"):   # the padded (N, S) rows of each unit, made once
    self.rows_of_unit = {}
if id(unit) not in self.rows_of_unit:
    self.rows_of_unit[id(unit)] = xp.zeros((self.count, unit.length), dtype=unit.parameters[0].dtype)
rows = self.rows_of_unit[id(unit)]
for p, place in unit.slots():
    if p.grad is not None:
        rows[:, place] += self._rows(p, p.grad)
    p.grad = None
gradient = xp.empty(unit.length, dtype=rows.dtype)
self.comm.reduce_scatter(rows.reshape(-1), gradient)
gradient /= self.count
self._add_to_parts(unit, gradient)
unit.sent = True
"""

WRONG = (
    Planted("zero_1", "gradient parts averaged by N − 1", ZERO,
            "        gradient /= self.count\n", "        gradient /= self.count - 1\n",
            "divided by N − 1 instead of N"),
    Planted("zero_1", "the updated parts never all-gathered", ZERO,
            "        if self.stage < 3:\n            for unit in self.units:\n                rows = self._all_gather",
            "        if self.stage < 0:\n            for unit in self.units:\n                rows = self._all_gather",
            "all-gather the updated parts"),
    Planted("zero_1", "part boundaries off by one (padding in front)", ZERO,
            "        rows.reshape(-1)[:array.size] = array.reshape(-1)\n",
            "        rows.reshape(-1)[rows.size - array.size:] = array.reshape(-1)\n",
            "the padding goes after them"),
    region("zero_1", "ZeRO-1 as an allreduce, each rank keeping its own row", ZERO,
           {"Zero._reduce_scatter": _ZERO_BY_ALLREDUCE}, "never an allreduce"),
    Planted("zero_1", "padding that turns float32 into float64", ZERO,
            "rows = xp.zeros((self.count, part_length(p.size, self.count)), dtype=array.dtype)",
            "rows = xp.zeros((self.count, part_length(p.size, self.count)), dtype=xp.float64)", "float32 run"),
    region("zero_1", "padded rows made once per unit and added into (step 2 holds step 1's gradient too)", ZERO,
           {"Zero._reduce_scatter": _ROWS_MADE_ONCE}, "previous step's gradient"),
    Planted("zero_1", "near miss: the gradient parts off by 1e-9 relative", ZERO,
            "        gradient /= self.count\n", "        gradient /= self.count * (1 + 1e-9)\n", "its part of dL/d"),
    Planted("zero_1", "parts of n // N elements (the remainder dropped when N does not divide n)", ZERO,
            "        rows = xp.zeros((self.count, part_length(p.size, self.count)), dtype=array.dtype)\n"
            "        rows.reshape(-1)[:array.size] = array.reshape(-1)\n",
            "        rows = xp.zeros((self.count, p.size // self.count), dtype=array.dtype)\n"
            "        rows.reshape(-1)[:] = array.reshape(-1)[:rows.size]\n", "no number is dropped"),
)

ALTERNATIVES = (
    region("zero_1", "rows by padding the flat array", ZERO, {"Zero._rows": """
flat = array.reshape(-1)
padded = xp.pad(flat, (0, self.count * part_length(p.size, self.count) - flat.size))
return padded.reshape(self.count, -1)
"""}, ""),
    Planted("zero_1", "divide by N before the reduce-scatter", ZERO,
            "        self.comm.reduce_scatter(rows.reshape(-1), gradient)\n        gradient /= self.count\n",
            "        rows /= self.count\n        self.comm.reduce_scatter(rows.reshape(-1), gradient)\n", ""),
)
