"""Cut a model into pipeline chunks: which pieces each rank runs.

A model reaches the pipeline as a chain of pieces, each feeding the next:

    [first, layer 0, layer 1, ..., layer L-1, last]

For a GPT (``GPT.pieces()``) that is [embedding, block 0..L-1, head]: the embedding takes token
ids (B, T), every block maps (B, T, C) to (B, T, C), and the head takes ``(x, targets)`` and returns
the scalar mean loss. Any plain stack of modules works the same way, an MLP for instance:
[input layer, hidden layers..., output layer with its loss].

The $L$ layers in the middle are the unit that is split. With $p$ stages and $v$ chunks per stage
("virtual stages", Narayanan et al. 2021, Megatron-LM) the chain is cut into $p·v$ chunks of
consecutive layers; the first piece joins chunk 0 and the last piece joins chunk $p·v − 1$. Chunks
are dealt round-robin, chunk $c$ to rank $c mod p$, so with $v = 2$ and $p = 4$:

    layers:  [0 1] [2 3] [4 5] [6 7] [8 9] [10 11] [12 13] [14 15]
    chunk:     0     1     2     3     4      5       6       7
    rank:      0     1     2     3     0      1       2       3

and a micro-batch crosses every rank $v$ times. The default split balances the layers:
every chunk gets $⌊L / (p·v)⌋$ layers and the first $L mod (p·v)$ chunks one more (GPipe,
Huang et al. 2019, balances by measured cost; equal transformer blocks make counting enough).
With interleaving, $L$ must be a multiple of $p·v$ unless a ``split`` is given, as Megatron-LM
requires, so that every virtual stage costs the same and the interleaved bubble formula
$(1/v)(p−1)/m$ holds.

Every rank builds the whole model from the same seed and keeps only its chunks, so the chunks
start as exact copies of the single-process parameters, each still labelled with its
single-process name (``parameter.shard.full_name``).

Tied embedding across stages. GPT's head multiplies by the token embedding $E$ (Press & Wolf
2017): one weight, two uses. In one process autograd adds the two contributions into one
gradient. Cut into stages, the embedding (chunk 0, rank 0) and the head (last chunk, rank $p−1$)
each hold a copy of $E$ and each gets only its own term of $∂L/∂E = g_{embedding} + g_{head}$, split
over two ranks. ``TiedEmbeddingGradientSum`` allreduces the copies' gradients between those two
ranks after backward, so both copies take the same update and stay equal forever. Forget it
and each copy follows only its own term: the model quietly drifts from single-process training.
"""
from minipar.backend import xp
from minipar.errors import ConfigError, require_positive_int
from minipar.nn.module import Module
from minipar.parallel.pipeline.schedules import LOOP, stage_of_chunk

TIED_EMBEDDING = "embedding.token.weight"  # the single-process name of GPT's tied weight


class PipelineChunk(Module):
    """A run of consecutive pieces that one rank executes as one unit of the schedule.

    ``forward(x, targets=None)``: the first chunk takes the model's input (token ids), the others
    an activation Tensor; every chunk but the last returns its output activation, the last one
    returns ``last_piece(x, targets)``, the scalar loss.

    ``piece_runner``: how a piece is called, ``piece_runner(piece, x, *targets)``; None calls the
    piece itself. The Trainer sets it from its gradient sync: ZeRO-3's ``Zero.run_gathered``
    gathers the piece's parameters around each call, so the pieces stay as they are.
    """

    def __init__(self, pieces, index, total_chunks, first_piece):
        self.pieces = list(pieces)
        self.index = index  # global chunk number c in 0 .. p·v - 1
        self.total_chunks = total_chunks
        self.first_piece = first_piece  # index of pieces[0] in the whole chain (for describing)
        self.piece_runner = None  # or a callable (piece, x, *targets) -> output

    @property
    def is_first(self):
        return self.index == 0

    @property
    def is_last(self):
        return self.index == self.total_chunks - 1

    def forward(self, x, targets=None):
        run = self.piece_runner or (lambda piece, *arguments: piece(*arguments))
        body = self.pieces[:-1] if self.is_last else self.pieces
        for piece in body:
            x = run(piece, x)
        if self.is_last:
            return run(self.pieces[-1], x, targets)
        return x

    def __repr__(self):
        last = self.first_piece + len(self.pieces) - 1
        return f"PipelineChunk({self.index} of {self.total_chunks}: pieces {self.first_piece}..{last})"


def layers_per_chunk(num_layers, num_stages, num_chunks=1, split=None):
    """How many of the L middle layers each of the p·v chunks gets (checked, as a list)."""
    for name, value in (("num_stages", num_stages), ("num_chunks", num_chunks)):
        require_positive_int(name, value)
    total_chunks = num_stages * num_chunks
    if split is not None:
        split = list(split)
        if len(split) != total_chunks:
            raise ConfigError(f"split has {len(split)} entries but the pipeline has {num_stages} stages x "
                              f"{num_chunks} chunks = {total_chunks} chunks; give one layer count per chunk")
        bad = [count for count in split if isinstance(count, bool) or not isinstance(count, int) or count < 1]
        if bad:
            raise ConfigError(f"every entry of split must be a positive integer (a chunk with no layers "
                              f"would only pass activations along), got {split}")
        if sum(split) != num_layers:
            raise ConfigError(f"split {split} sums to {sum(split)} layers but the model has {num_layers}")
        return split
    if total_chunks > num_layers:
        raise ConfigError(f"{num_stages} stages x {num_chunks} chunks = {total_chunks} chunks, but the model has "
                          f"only {num_layers} layers to share out; every chunk needs at least one layer, so use "
                          f"at most {num_layers} chunks in all")
    if num_chunks > 1 and num_layers % total_chunks:
        raise ConfigError(f"interleaving {num_chunks} chunks per stage over {num_stages} stages needs the "
                          f"{num_layers} layers to be a multiple of {total_chunks} (equal virtual stages); "
                          f"change num_chunks or n_layer, or give an explicit split")
    base, extra = divmod(num_layers, total_chunks)
    return [base + (1 if chunk < extra else 0) for chunk in range(total_chunks)]


def chunk_piece_ranges(num_pieces, num_stages, num_chunks=1, split=None):
    """(start, stop) of every chunk in the chain of ``num_pieces`` pieces, for all p·v chunks.

    Chunk c holds pieces[start:stop]; the first piece sits in chunk 0 and the last in the last chunk.
    """
    if num_pieces < 2:
        raise ConfigError(f"a pipeline needs at least a first and a last piece, got {num_pieces} pieces")
    counts = layers_per_chunk(num_pieces - 2, num_stages, num_chunks, split)
    ranges, start = [], 0
    for chunk, count in enumerate(counts):
        stop = start + count + (1 if chunk == 0 else 0) + (1 if chunk == len(counts) - 1 else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def partition(pieces, num_stages, stage, num_chunks=1, split=None, placement=LOOP):
    """This rank's chunks: a list of ``num_chunks`` PipelineChunks, global chunks stage, stage+p, ...

    ``placement="v"`` (ZB-V, ``schedules.placement_of("zbv")``) deals them down and back up
    instead: with num_chunks = 2, rank r gets chunks r and 2p-1-r, so rank 0 holds both ends.
    ``pieces``: the model as a chain [first, layer 0..L-1, last] (``GPT.pieces()``).
    ``split``: optional layer count per chunk (p·v positive integers summing to L); by default
    the layers are balanced. Every check depends on the configuration only, never on ``stage``,
    so every rank raises the same ``ConfigError``.
    """
    pieces = list(pieces)
    not_modules = [i for i, piece in enumerate(pieces) if not isinstance(piece, Module)]
    if not_modules:
        raise ConfigError(f"pieces must be Modules; entries {not_modules} are not")
    ranges = chunk_piece_ranges(len(pieces), num_stages, num_chunks, split)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < num_stages:
        raise ConfigError(f"stage must be an integer in [0, {num_stages}), got {stage!r}")
    total_chunks = num_stages * num_chunks
    return [PipelineChunk(pieces[start:stop], chunk, total_chunks, start)
            for chunk, (start, stop) in enumerate(ranges) if stage_of_chunk(chunk, num_stages, placement) == stage]


def stage_parameters(chunks):
    """(full name, Parameter) for every parameter of this rank's chunks, each object once.

    A parameter can sit in two chunks of one rank: the tied embedding with $p = 1$ and $v > 1$ is one
    object in chunk 0 and in the last chunk. Give the optimizer this list, not the chunks' lists
    joined, or that weight would be updated twice.
    """
    seen, named = set(), []
    for chunk in chunks:
        for name, parameter in chunk.named_parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                shard = getattr(parameter, "shard", None)
                named.append((shard.full_name if shard is not None else (parameter.name or name), parameter))
    return named


class TiedEmbeddingGradientSum:
    """Sums the gradients of the tied weight's two copies, first and last stage, after backward.

        tied = TiedEmbeddingGradientSum(stage_parameters(chunks), grid.pp)   # every pp rank, once
        ... backward ...; tied.finish_gradient_sync()                        # every pp rank, each step

    ``named_tensors``: (full name, tensor) for what this rank updates (the parameters, or under
    ZeRO their parts: the same positions on both ends, so the sum holds on parts too). Building
    it is collective over ``pp_comm``: every rank says whether it holds ``full_name`` (small
    metadata), so all agree on the check, and the two ends get a communicator of their own.
    With $p = 1$ there is one copy and nothing to do; a model with the weight on neither end (an
    MLP) is a no-op; a model with it on one end only is a ConfigError on every rank.
    """

    def __init__(self, named_tensors, pp_comm, full_name=TIED_EMBEDDING, head_stage=None):
        """``head_stage``: the stage holding the last chunk (default p - 1; 0 under ZB-V's V, where
        the embedding and the head share rank 0, so its one copy already gets both terms)."""
        self.copy = self.ends = None
        last = pp_comm.size - 1 if head_stage is None else head_stage
        if last == 0:
            return
        copies = [tensor for name, tensor in named_tensors if name == full_name]
        held = pp_comm.mpi.allgather(len(copies) == 1)
        if held[0] != held[last]:
            raise ConfigError(f"{full_name} is held by the {'first' if held[0] else 'last'} stage only; "
                              f"the first and last stage must both hold a copy of the tied weight")
        if not held[0]:
            return
        ends = pp_comm.split(color=0 if pp_comm.rank in (0, last) else 1, key=pp_comm.rank)
        if pp_comm.rank in (0, last):
            (self.copy,), self.ends = copies, ends

    def finish_gradient_sync(self):
        """dL/dE = g_embedding + g_head on both ends; nothing on the stages in between."""
        if self.copy is None:
            return
        if self.copy.grad is None:
            self.copy.grad = xp.zeros_like(self.copy.data)
        elif not self.copy.grad.flags.c_contiguous:  # the head's gradient arrives through a transpose
            self.copy.grad = xp.ascontiguousarray(self.copy.grad)
        self.ends.allreduce(self.copy.grad)
