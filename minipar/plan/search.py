"""The search: every layout of the machine's ranks, each predicted; those that fit, fastest first.

A layout is dp × tp × pp × cp ranks (ep carved out of dp·cp for experts), a schedule (GPipe,
1F1B, interleaved with $v$ = 2 or 4, the zero-bubble ZB-H1, ZB-H2 and ZB-V), a micro-batch split,
a ZeRO stage, sequence parallelism, recomputation and a precision. Tensor (and context)
parallelism stay inside a node: their collectives run in every layer (Narayanan et al. 2021,
§3.2). Micro-batches of 1 and 2 rows, and the fewest that fill the pipeline ($m ≥ p$).

minipar's own engine (``engine="minipar"``) runs the schedules its executor has
(``minipar.parallel.pipeline.schedules.SCHEDULE_NAMES``); the other engines plan them all.
"""
import itertools

from minipar.plan.cost import predict
from minipar.plan.model import divisors
from minipar.plan.strategy import SCHEDULES, Strategy, check_strategy

DEFAULT_OPTIONS = {"zero": (0, 1, 2, 3), "sp": (False, True), "recompute": ("", "selective", "full"),
                   "precision": ("mixed",), "schedules": SCHEDULES, "virtual": (2, 4), "cp": (1,),
                   "engine": "minipar", "state_bytes": 16, "tp": None}


def runnable_schedules(engine, wanted):
    """The schedules to try: for minipar's engine, those its executor runs today."""
    if engine != "minipar":
        return tuple(wanted)
    from minipar.parallel.pipeline.schedules import SCHEDULE_NAMES

    # ZB-V runs in minipar, but its V placement (rank 0 holds both the embedding and the head) is
    # not yet in the byte-exact model of what each rank holds and sends (strategy.rank_chunks), so
    # minipar's engine does not offer it; the paper engines plan it from its formulas.
    return tuple(name for name in wanted if name in SCHEDULE_NAMES and name != "zbv")


def _schedules(pp, m, options):
    """(schedule, v) pairs for a pipeline of pp stages and m micro-batches."""
    if pp == 1:
        return [("1f1b", 1)]
    out = []
    for name in runnable_schedules(options["engine"], options["schedules"]):
        if name == "interleaved":
            out += [(name, v) for v in options["virtual"] if m % pp == 0]
        elif name == "zbv":
            out.append((name, 2))
        else:
            out.append((name, 1))
    return out


def candidate_grids(model, world, gpus_per_node, options):
    """Every grid the search tries on N = ``world`` ranks: yields ``(dp, tp, pp, cp, ep)`` with
    $dp · tp · pp · cp = N$, before any schedule, micro-batch count or memory is considered.

    Tensor and context parallelism stay inside a node of G = ``gpus_per_node`` GPUs ($tp · cp ≤ G$;
    tp divides min(N, G), or is one of ``options["tp"]`` when given; cp is one of ``options["cp"]``),
    no stage is left without a layer ($pp ≤ L$, L = ``model.n_layer``), and ep, for a model with
    experts, divides both the number of experts and $dp · cp$ (ep = 1 without experts).
    ``options``: ``DEFAULT_OPTIONS``, or a dict with its "tp" and "cp" keys.
    """
    for tp, cp in itertools.product(options["tp"] or divisors(min(world, gpus_per_node)), options["cp"]):
        if tp * cp > gpus_per_node or world % (tp * cp):
            continue
        for pp in divisors(world // (tp * cp)):
            dp = world // (tp * cp * pp)
            if pp > model.n_layer:
                continue
            eps = [e for e in divisors(model.experts) if (dp * cp) % e == 0] if model.experts > 1 else [1]
            for ep in eps:
                yield dp, tp, pp, cp, ep


def candidate_strategies(model, world, batch_size, gpus_per_node, options):
    """Every layout of ``world`` ranks for this model, with the options to try (module docstring)."""
    options = {**DEFAULT_OPTIONS, **options}
    for dp, tp, pp, cp, ep in candidate_grids(model, world, gpus_per_node, options):
        if batch_size % dp:
            continue
        per_replica = batch_size // dp
        counts = [m for m in divisors(per_replica) if m >= pp]
        counts = sorted({m for m in counts if per_replica // m in (1, 2)} | set(counts[:1]))
        for m, zero, sp, recompute, precision in itertools.product(
                counts, options["zero"], options["sp"], options["recompute"], options["precision"]):
            if zero and dp == 1 or sp and tp == 1:
                continue
            for schedule, v in _schedules(pp, m, options):
                strategy = Strategy(dp, tp, pp, batch_size, m, schedule, v, zero, sp, recompute, precision,
                                    cp=cp, ep=ep, state_bytes=options["state_bytes"], engine=options["engine"])
                if check_strategy(model, strategy) is None:
                    yield strategy


def rank_layouts(model, machine, batch_size, options, overlap=True, headroom=None):
    """(fitting predictions sorted by step time, all predictions) for ``machine.gpus`` ranks; a
    layout that does not fit is not timed (its ``time`` is None)."""
    predictions = [predict(model, s, machine, overlap, headroom, timed=False)  # time only what fits
                   for s in candidate_strategies(model, machine.gpus, batch_size, machine.gpus_per_node, options)]
    fitting = sorted((p for p in predictions if p.fits), key=lambda p: p.step)
    return fitting, predictions
