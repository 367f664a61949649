"""Characters in, batches out: the tokenizer, the two datasets and batch sampling.

Two datasets are built in:

* ``addition_dataset()`` -- the default. It needs no download: lines such as
  ``07+45=250`` (7 + 45 = 052, answer written backwards) generated from a fixed
  seed. ``answer_accuracy`` shows a model learning it: the fraction of
  held-out sums it gets exactly right. A 2-layer, 64-wide GPT (block size 10,
  batch 64, AdamW at 3e-3) went from 1% to 89% between steps 500 and 750,
  a few minutes on two CPU cores.
* ``load_text_dataset(path, block_size)`` -- any UTF-8 text file
  (tiny-shakespeare style), split 90/10 into training and validation.

Language modelling on a token stream x_1..x_n: a training example is a window
x_t..x_{t+T-1} of T = ``block_size`` tokens, and its targets are the same
window shifted by one, x_{t+1}..x_{t+T} -- the model predicts each next token
(Radford et al. 2018, "Improving Language Understanding by Generative
Pre-Training", section 3.1).

Batches are a pure function of (seed, step, split): every process that asks
for step 7 gets the same global batch, so a data-parallel rank can take its
own rows without any communication (``minipar.parallel.batch_split.local_slice``).
"""
from dataclasses import dataclass
from pathlib import Path

# NumPy's Generator picks the window starts on the host, for every backend:
# it is randomness, not compute, and CuPy's random streams differ from NumPy's,
# so picking them here keeps batches identical whichever backend runs.
from numpy.random import PCG64, Generator, SeedSequence, default_rng

from minipar.backend import from_host, to_host, xp
from minipar.errors import ConfigError, DataError

SPLITS = ("train", "validation")


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of ``text``."""

    def __init__(self, text):
        self.characters = "".join(sorted(set(text)))
        if not self.characters:
            raise DataError("cannot build a tokenizer from empty text")
        self.id_of = {character: index for index, character in enumerate(self.characters)}

    @property
    def vocab_size(self):
        return len(self.characters)

    def encode(self, text):
        """The token ids of ``text``, as an int64 array."""
        try:
            ids = [self.id_of[character] for character in text]
        except KeyError:
            unknown = sorted(set(text) - set(self.characters))
            raise DataError(
                f"characters not in the vocabulary: {', '.join(map(repr, unknown))} "
                f"(the vocabulary has {self.vocab_size}: {self.characters!r})") from None
        return xp.asarray(ids, dtype=xp.int64)

    def decode(self, ids):
        """The text of a 1-D sequence of token ids (array or list)."""
        ids = to_host(xp.asarray(ids))
        if ids.ndim != 1:
            raise DataError(f"decode takes a 1-D sequence of ids, got shape {ids.shape}")
        bad = [int(i) for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise DataError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:10]}")
        return "".join(self.characters[int(i)] for i in ids)

    def to_dict(self):
        """A JSON-serialisable description, stored in checkpoints so ``sample`` can decode."""
        return {"kind": "char", "characters": self.characters}

    @classmethod
    def from_dict(cls, description):
        if not isinstance(description, dict) or description.get("kind") != "char" \
                or not isinstance(description.get("characters"), str):
            raise DataError(f"not a character tokenizer description: {description!r}")
        tokenizer = cls(description["characters"])
        if tokenizer.characters != description["characters"]:
            raise DataError("tokenizer characters must be sorted and unique")
        return tokenizer


# --- the default dataset: multi-digit addition ------------------------------------------

ADDITION_ALPHABET = "\n+0123456789="


@dataclass(frozen=True)
class AdditionProblem:
    """``left + right`` written with zero-padded operands and the sum reversed.

    With ``digits = 2``, 7 + 45 is the line ``07+45=250``: the sum 52 padded to
    ``digits + 1`` places is ``052``, written backwards. Writing the answer
    least significant digit first lets the model produce it the way column
    addition works: each output digit depends only on the two operand digits in
    that column and the carry from the digit it has just written. In normal
    order the first digit written would depend on every carry still to come.
    Lee et al. 2023, "Teaching Arithmetic to Small Transformers", show that
    this reversal makes small GPTs learn addition with far less data. Padding
    puts every digit at a fixed position in the line, so no counting is needed.
    """
    left: int
    right: int
    digits: int

    @property
    def prompt(self):
        return f"{self.left:0{self.digits}d}+{self.right:0{self.digits}d}="

    @property
    def answer(self):
        return f"{self.left + self.right:0{self.digits + 1}d}"[::-1]

    @property
    def line(self):
        return self.prompt + self.answer + "\n"


def addition_problems(digits=2, validation_problems=1000, training_problems=None, seed=0):
    """Disjoint (training, validation) lists of addition problems, chosen by ``seed``.

    All 10^(2·digits) ordered pairs are candidates; one draw without
    replacement gives validation first and training after, so no validation
    problem can appear in training. ``training_problems=None`` takes every
    remaining pair, at most 200,000.
    """
    if not isinstance(digits, int) or not 1 <= digits <= 9:
        raise ConfigError(f"addition digits must be an integer from 1 to 9, got {digits!r}")
    total = 10 ** (2 * digits)
    if training_problems is None:
        training_problems = min(total - validation_problems, 200_000)
    if validation_problems < 1 or training_problems < 1 or validation_problems + training_problems > total:
        raise ConfigError(
            f"{digits}-digit addition has {total} distinct problems; cannot hold out "
            f"{validation_problems} for validation and train on {training_problems}")
    generator = default_rng(seed)
    codes = generator.choice(total, size=validation_problems + training_problems, replace=False)
    problems = [AdditionProblem(int(code) // 10 ** digits, int(code) % 10 ** digits, digits)
                for code in codes]
    return problems[validation_problems:], problems[:validation_problems]


def addition_dataset(digits=2, validation_problems=1000, training_problems=None, seed=0):
    """The default dataset: training and validation streams of addition lines.

    Defaults: 2-digit + 2-digit, 9,000 training and 1,000 held-out problems,
    10 characters per line, a vocabulary of 13 characters. Training windows
    start only at line starts (``window_stride`` = line length), so each digit
    of a problem always has the same position in the window and the model can
    find the digits to add by position alone; with windows starting anywhere it
    must first work out where each line begins, and learns far more slowly.
    """
    training, validation = addition_problems(digits, validation_problems, training_problems, seed)
    tokenizer = CharTokenizer(ADDITION_ALPHABET)
    return Dataset(
        tokenizer.encode("".join(problem.line for problem in training)),
        tokenizer.encode("".join(problem.line for problem in validation)),
        tokenizer,
        name=f"addition ({digits}+{digits} digits, {len(training)} training / "
             f"{len(validation)} validation problems, answers reversed)",
        validation_problems=validation, window_stride=len(training[0].line))


@dataclass(frozen=True)
class AnswerAccuracy:
    exact_match: float         # fraction of problems whose whole answer is right
    character_accuracy: float  # fraction of answer digits right, position by position
    problems: int
    examples: tuple            # the first few (prompt, expected answer, generated answer)


def answer_accuracy(generate_fn, problems, tokenizer=None, batch_size=1000):
    """Score greedy answers to ``problems``.

    ``generate_fn(prompt_ids, max_new_tokens)`` receives an int64 array of shape
    (batch, prompt length) and returns either the continuation alone, shape
    (batch, max_new_tokens), or the prompt followed by it (nanoGPT's
    convention). It should decode greedily (argmax) so the score is
    reproducible. Prompts sit at position 0, where every training window of
    the addition dataset starts (``window_stride``).
    """
    tokenizer = tokenizer or CharTokenizer(ADDITION_ALPHABET)
    problems = list(problems)
    if not problems:
        raise ConfigError("answer_accuracy needs at least one problem")
    if len({len(problem.prompt) for problem in problems}) != 1:
        raise ConfigError("answer_accuracy needs problems with the same number of digits")
    answer_length = len(problems[0].answer)
    exact, characters_right, examples = 0, 0, []
    for first in range(0, len(problems), batch_size):
        chunk = problems[first:first + batch_size]
        prompts = xp.stack([tokenizer.encode(problem.prompt) for problem in chunk])
        generated = generate_fn(prompts, answer_length)
        width = generated.shape[-1] if generated.ndim == 2 else None
        if generated.shape[0] != len(chunk) or width not in (answer_length, prompts.shape[1] + answer_length):
            raise ValueError(
                f"generate_fn returned shape {tuple(generated.shape)}; expected ({len(chunk)}, "
                f"{answer_length}) or ({len(chunk)}, {prompts.shape[1] + answer_length})")
        for problem, row in zip(chunk, generated[:, width - answer_length:]):
            answer = tokenizer.decode(row)
            exact += answer == problem.answer
            characters_right += sum(a == b for a, b in zip(answer, problem.answer))
            if len(examples) < 5:
                examples.append((problem.prompt, problem.answer, answer))
    return AnswerAccuracy(exact / len(problems), characters_right / (len(problems) * answer_length),
                          len(problems), tuple(examples))


# --- any text file ----------------------------------------------------------------------

def load_text_dataset(path, block_size, validation_fraction=0.1):
    """A dataset from a UTF-8 text file: the first 90% trains, the last 10% validates."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
    if not 0 < validation_fraction < 1:
        raise ConfigError(f"validation_fraction must lie strictly between 0 and 1, got {validation_fraction}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a directory; pass a text file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read data file {str(path)!r}: {error.strerror}") from error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text: byte {error.start} is "
                        f"{raw[error.start:error.start + 1]!r} ({error.reason})") from None
    validation_start = int(len(text) * (1 - validation_fraction))
    shortest = min(validation_start, len(text) - validation_start)
    if shortest < block_size + 1:
        raise DataError(
            f"data file {str(path)!r} has {len(text)} characters, too short for block size {block_size}: "
            f"each of the training and validation splits ({validation_start} and "
            f"{len(text) - validation_start} characters) needs at least block_size + 1 = {block_size + 1}")
    tokenizer = CharTokenizer(text)
    tokens = tokenizer.encode(text)
    return Dataset(tokens[:validation_start], tokens[validation_start:], tokenizer,
                   name=f"{path.name} ({len(text)} characters, vocabulary {tokenizer.vocab_size})")


# --- batches ----------------------------------------------------------------------------

class Dataset:
    """Training and validation token streams (int64) plus the tokenizer that made them.

    ``validation_problems`` is set for the addition task (for ``answer_accuracy``)
    and None for a text file. Windows start at multiples of ``window_stride``
    tokens: 1 for text, the line length for the addition task.
    """

    def __init__(self, train_tokens, validation_tokens, tokenizer, name="", validation_problems=None,
                 window_stride=1):
        self.tokens = {"train": xp.asarray(train_tokens, dtype=xp.int64),
                       "validation": xp.asarray(validation_tokens, dtype=xp.int64)}
        for split, tokens in self.tokens.items():
            if tokens.ndim != 1:
                raise DataError(f"{split} tokens must be 1-D, got shape {tokens.shape}")
        self.tokenizer = tokenizer
        self.name = name
        self.validation_problems = validation_problems
        if not isinstance(window_stride, int) or window_stride < 1:
            raise ConfigError(f"window_stride must be a positive integer, got {window_stride!r}")
        self.window_stride = window_stride

    def get_batch(self, split, batch_size, block_size, seed, step):
        """``(inputs, targets)``, each int64 of shape (batch_size, block_size); targets[:, t] = inputs[:, t+1].

        Rows are windows at random starts (multiples of ``window_stride``) drawn
        from a generator seeded by (seed, step, split) alone, so every process
        gets the same batch.
        """
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        for label, value in (("batch_size", batch_size), ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{label} must be a positive integer, got {value!r}")
        if not (isinstance(seed, int) and isinstance(step, int) and seed >= 0 and step >= 0):
            raise ConfigError(f"seed and step must be non-negative integers, got {seed!r} and {step!r}")
        tokens = self.tokens[split]
        if len(tokens) < block_size + 1:
            raise DataError(f"the {split} split has {len(tokens)} tokens; block size {block_size} "
                            f"needs at least {block_size + 1}")
        generator = Generator(PCG64(SeedSequence([seed, step, SPLITS.index(split)])))
        # The last allowed start is len - block_size - 1, so the shifted target window still fits.
        start_count = (len(tokens) - block_size - 1) // self.window_stride + 1
        starts = self.window_stride * generator.integers(0, start_count, size=batch_size)
        windows = tokens[from_host(starts)[:, None] + xp.arange(block_size + 1)]
        return xp.ascontiguousarray(windows[:, :-1]), xp.ascontiguousarray(windows[:, 1:])

    def validation_batches(self, batch_size, block_size, count, seed=0):
        """A fixed list of ``count`` validation batches: the same list on every call and every rank."""
        return [self.get_batch("validation", batch_size, block_size, seed, step) for step in range(count)]


def check_token_ids(inputs, targets, vocab_size):
    """Ids and targets must lie in [0, vocab_size): checked here, on every rank, before the step starts,
    rather than inside the first or last pipeline stage alone while the others wait. On a GPU (where a
    bad id would silently wrap) their ranges come to the host as one named copy of four integers."""
    checked = [(what, ids) for what, ids in (("input ids", inputs), ("targets", targets)) if ids.size]
    if not checked:
        return
    bounds = to_host(xp.stack([bound for _, ids in checked for bound in (ids.min(), ids.max())]))
    for (what, _), (lowest, highest) in zip(checked, bounds.reshape(-1, 2).tolist(), strict=True):
        if lowest < 0 or highest >= vocab_size:
            raise DataError(f"{what} must lie in [0, {vocab_size}), got values from {lowest} to {highest}")
