"""ZeRO's units: the parameters reduce-scattered and all-gathered together, by one call each.

A parameter of n numbers is cut into N parts of s = ceil(n / N) numbers (padded with zeros to N s);
a unit's buffer holds rank d's part of each of its parameters side by side, S numbers in all, and
the collective's buffer is rank-major, [part 0 of each | part 1 of each | ...] (parallel/zero.py).
"""


def part_length(size, count):
    """s = ceil(n / N): each of N ranks owns s numbers of a parameter of n, padded to N s."""
    return -(-size // count)


class Unit:
    """Parameters that are reduce-scattered and all-gathered together, by one call each."""

    def __init__(self, parameters, count):
        self.parameters = parameters
        lengths = [part_length(p.size, count) for p in parameters]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        self.places = [slice(start, start + length) for start, length in zip(starts, lengths, strict=True)]
        self.length = sum(lengths)  # S: this rank's part of every parameter of the unit
        self.final = 0  # parameters whose gradient of the current micro-batch is complete
        self.sent = False  # reduce-scattered at least once in this step
        self.gradient = None  # (S,): this rank's part of the averaged gradient, summed over sends

    def slots(self):
        return zip(self.parameters, self.places, strict=True)


def make_units(pieces, count):
    """One unit per piece for its own parameters, one per parameter shared by pieces; and
    {id(piece): the units it needs}, {id(p): how many pieces use p}."""
    uses = {}
    for piece in pieces:
        for p in piece.parameters():
            uses[id(p)] = uses.get(id(p), 0) + 1
    units, needs, alone = [], {}, {}
    for piece in pieces:
        own = [p for p in piece.parameters() if uses[id(p)] == 1]
        needs[id(piece)] = [Unit(own, count)] if own else []
        units += needs[id(piece)]
        for p in (p for p in piece.parameters() if uses[id(p)] > 1):
            if id(p) not in alone:
                units.append(alone.setdefault(id(p), Unit([p], count)))
            needs[id(piece)].append(alone[id(p)])
    return units, needs, uses
