"""Tests for minipar.data: tokenizer, the addition task and its metric, text files, batches."""
import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.backend import to_host, xp
from minipar.data import (
    ADDITION_ALPHABET,
    AdditionProblem,
    CharTokenizer,
    Dataset,
    addition_dataset,
    addition_problems,
    answer_accuracy,
    load_text_dataset,
)
from minipar.errors import ConfigError, DataError
from minipar.parallel.data_parallel import local_slice

# --- tokenizer ---------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_tokenizer_round_trip_any_text(text):
    tokenizer = CharTokenizer(text)
    ids = tokenizer.encode(text)
    assert ids.dtype == xp.int64 and ids.shape == (len(text),)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(to_host(ids).tolist()) == text


def test_tokenizer_vocabulary_is_sorted_unique_characters():
    tokenizer = CharTokenizer("hello world")
    assert tokenizer.characters == " dehlorw"
    assert tokenizer.vocab_size == 8
    assert to_host(tokenizer.encode("hold")).tolist() == [3, 5, 4, 1]


def test_tokenizer_names_unknown_characters():
    tokenizer = CharTokenizer("abc")
    with pytest.raises(DataError, match=r"characters not in the vocabulary: 'x', 'z'"):
        tokenizer.encode("abzxa")


def test_tokenizer_decode_rejects_ids_outside_vocabulary():
    tokenizer = CharTokenizer("abc")
    with pytest.raises(DataError, match=r"outside the vocabulary \[0, 3\): \[3, -1\]"):
        tokenizer.decode([0, 3, -1])
    with pytest.raises(DataError, match="1-D"):
        tokenizer.decode([[0, 1]])


def test_tokenizer_dict_survives_json():
    tokenizer = CharTokenizer("the quick brown fox\n")
    restored = CharTokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert restored.characters == tokenizer.characters
    assert to_host(restored.encode("fox")).tolist() == to_host(tokenizer.encode("fox")).tolist()


@pytest.mark.parametrize("description", [None, {"kind": "bpe"}, {"kind": "char"}, {"kind": "char", "characters": "ba"}])
def test_tokenizer_from_bad_dict(description):
    with pytest.raises(DataError):
        CharTokenizer.from_dict(description)


# --- the addition task -------------------------------------------------------------------

@pytest.mark.parametrize("left, right, digits, line", [
    (7, 45, 2, "07+45=250\n"),     # 052 reversed
    (99, 99, 2, "99+99=891\n"),    # 198 reversed
    (0, 0, 2, "00+00=000\n"),
    (123, 45, 3, "123+045=8610\n"),  # 0168 reversed
])
def test_addition_line_format(left, right, digits, line):
    assert AdditionProblem(left, right, digits).line == line


def test_addition_answers_are_correct_sums():
    training, validation = addition_problems(digits=3, validation_problems=200, training_problems=2000, seed=5)
    for problem in training + validation:
        assert int(problem.answer[::-1]) == problem.left + problem.right
        assert len(problem.line) == 2 * 3 + 2 + 4 + 1


def test_addition_splits_are_disjoint_and_sized():
    training, validation = addition_problems(digits=2, validation_problems=1000, seed=0)
    assert len(training) == 9000 and len(validation) == 1000
    training_pairs = {(p.left, p.right) for p in training}
    validation_pairs = {(p.left, p.right) for p in validation}
    assert len(training_pairs) == 9000 and len(validation_pairs) == 1000
    assert not training_pairs & validation_pairs


def test_validation_problems_never_appear_in_the_training_stream():
    dataset = addition_dataset(digits=2, validation_problems=500, seed=3)
    tokenizer = dataset.tokenizer
    training_lines = set(tokenizer.decode(dataset.tokens["train"]).split("\n"))
    validation_lines = tokenizer.decode(dataset.tokens["validation"]).split("\n")[:-1]
    assert len(validation_lines) == 500
    assert {problem.line[:-1] for problem in dataset.validation_problems} == set(validation_lines)
    assert not training_lines & set(validation_lines)


def test_addition_dataset_is_deterministic_per_seed():
    first, second, other = addition_dataset(seed=1), addition_dataset(seed=1), addition_dataset(seed=2)
    assert xp.array_equal(first.tokens["train"], second.tokens["train"])
    assert xp.array_equal(first.tokens["validation"], second.tokens["validation"])
    assert not xp.array_equal(first.tokens["train"], other.tokens["train"])
    assert first.tokenizer.characters == "".join(sorted(ADDITION_ALPHABET)) and first.tokenizer.vocab_size == 13


@pytest.mark.parametrize("kwargs", [{"digits": 0}, {"digits": 2, "validation_problems": 10_001},
                                    {"digits": 1, "validation_problems": 50, "training_problems": 51}])
def test_addition_rejects_impossible_configurations(kwargs):
    with pytest.raises(ConfigError):
        addition_problems(**kwargs)


# --- the answer accuracy metric ----------------------------------------------------------

TOKENIZER = CharTokenizer(ADDITION_ALPHABET)


def fake_model(answer_for, include_prompt=True, seen_prompts=None):
    """A generate_fn that answers each prompt with ``answer_for(prompt_text)``."""
    def generate(prompt_ids, max_new_tokens):
        rows = []
        for row in prompt_ids:
            prompt = TOKENIZER.decode(row)
            if seen_prompts is not None:
                seen_prompts.append(prompt)
            answer = TOKENIZER.encode(answer_for(prompt)[:max_new_tokens])
            rows.append(xp.concatenate([row, answer]) if include_prompt else answer)
        return xp.stack(rows)
    return generate


def true_answer(prompt):
    left, right = prompt.strip().rstrip("=").split("+")
    return f"{int(left) + int(right):0{len(left) + 1}d}"[::-1]


@pytest.mark.parametrize("include_prompt", [True, False])
def test_accuracy_of_a_perfect_model(include_prompt):
    _, validation = addition_problems(digits=2, validation_problems=300, seed=0)
    seen = []
    result = answer_accuracy(fake_model(true_answer, include_prompt, seen), validation, batch_size=128)
    assert (result.exact_match, result.character_accuracy, result.problems) == (1.0, 1.0, 300)
    assert seen[0] == validation[0].prompt and len(seen) == 300
    assert result.examples[0] == (validation[0].prompt, validation[0].answer, validation[0].answer)


def test_accuracy_counts_wrong_answers_and_wrong_digits():
    problems = [AdditionProblem(7, 45, 2), AdditionProblem(10, 20, 2),
                AdditionProblem(99, 99, 2), AdditionProblem(50, 50, 2)]
    replies = {"07+45=": "250",   # right
               "10+20=": "030",   # right
               "99+99=": "881",   # middle digit wrong (891 expected)
               "50+50=": "999"}   # all three wrong (001 expected)
    result = answer_accuracy(fake_model(replies.__getitem__), problems)
    assert result.exact_match == 0.5
    assert result.character_accuracy == pytest.approx((3 + 3 + 2 + 0) / 12)


def test_accuracy_rejects_a_generate_fn_of_the_wrong_shape():
    problems = [AdditionProblem(1, 2, 2)]
    with pytest.raises(ValueError, match="generate_fn returned shape"):
        answer_accuracy(lambda prompts, n: xp.zeros((1, 2), dtype=xp.int64), problems)


# --- text files --------------------------------------------------------------------------

def test_text_dataset_splits_ninety_ten(tmp_path):
    text = "To be, or not to be: that is the question.\n" * 20
    path = tmp_path / "play.txt"
    path.write_text(text, encoding="utf-8")
    dataset = load_text_dataset(path, block_size=16)
    train, validation = dataset.tokens["train"], dataset.tokens["validation"]
    assert train.dtype == xp.int64 and len(train) == int(len(text) * 0.9)
    assert dataset.tokenizer.decode(train) + dataset.tokenizer.decode(validation) == text
    assert dataset.validation_problems is None


def test_text_dataset_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text_dataset(tmp_path / "nope.txt", block_size=8)


def test_text_dataset_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_text_dataset(tmp_path, block_size=8)


def test_text_dataset_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait ".encode("latin-1") * 50)
    with pytest.raises(DataError, match=r"not UTF-8 text: byte 3 is b'\\xe9'"):
        load_text_dataset(path, block_size=8)


@pytest.mark.parametrize("text", ["", "short text, long blocks " * 10])
def test_text_dataset_too_short_for_block_size(tmp_path, text):
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"has {len(text)} characters, too short for block size 64"):
        load_text_dataset(path, block_size=64)


# --- batches -----------------------------------------------------------------------------

def counting_dataset():
    """Token i at position i, so a window is recognisable as consecutive integers."""
    return Dataset(xp.arange(1000), xp.arange(1000, 1200), tokenizer=None)


def test_targets_are_inputs_shifted_by_one():
    inputs, targets = counting_dataset().get_batch("train", 32, 17, seed=0, step=4)
    assert inputs.shape == targets.shape == (32, 17) and inputs.dtype == targets.dtype == xp.int64
    assert xp.array_equal(targets, inputs + 1)
    assert xp.array_equal(inputs, inputs[:, :1] + xp.arange(17))  # each row is a contiguous window
    assert int(inputs.min()) >= 0 and int(targets.max()) <= 999


def test_every_window_start_is_reachable_and_none_runs_past_the_end():
    block_size = 5
    dataset = Dataset(xp.arange(block_size + 3), xp.arange(block_size + 1), tokenizer=None)  # 3 and 1 windows
    starts = {int(row[0]) for step in range(20) for row in dataset.get_batch("train", 16, block_size, 0, step)[0]}
    assert starts == {0, 1, 2}
    inputs, targets = dataset.get_batch("validation", 16, block_size, 0, 0)
    assert xp.array_equal(inputs, xp.broadcast_to(xp.arange(5), (16, 5)))
    assert xp.array_equal(targets, inputs + 1)


def test_window_stride_keeps_starts_aligned_up_to_the_last_fitting_one():
    dataset = Dataset(xp.arange(23), xp.arange(23), tokenizer=None, window_stride=5)
    starts = {int(row[0]) for step in range(20) for row in dataset.get_batch("train", 16, 5, 0, step)[0]}
    assert starts == {0, 5, 10, 15}  # 20 would need token 25 as its last target


@pytest.mark.parametrize("block_size", [10, 25])
def test_addition_windows_start_at_line_starts(block_size):
    dataset = addition_dataset()
    assert dataset.window_stride == 10
    inputs, targets = dataset.get_batch("train", 64, block_size, seed=0, step=0)
    for row in inputs:
        assert re.fullmatch(r"\d\d\+\d\d=\d\d\d\n", dataset.tokenizer.decode(row[:10]))


def test_batches_depend_only_on_seed_step_and_split():
    dataset = counting_dataset()
    first = dataset.get_batch("train", 8, 5, seed=3, step=11)
    assert all(xp.array_equal(a, b) for a, b in zip(first, dataset.get_batch("train", 8, 5, seed=3, step=11)))
    assert not xp.array_equal(first[0], dataset.get_batch("train", 8, 5, seed=3, step=12)[0])
    assert not xp.array_equal(first[0], dataset.get_batch("train", 8, 5, seed=4, step=11)[0])
    validation_inputs, _ = dataset.get_batch("validation", 8, 5, seed=3, step=11)
    assert int(validation_inputs.min()) >= 1000


def test_batches_are_identical_in_another_process():
    """What each MPI rank relies on: a fresh interpreter draws the same batch."""
    program = ("from minipar.data import addition_dataset; from minipar.backend import to_host; "
               "x, y = addition_dataset().get_batch('train', 6, 12, seed=9, step=123); "
               "print(to_host(x).tolist(), to_host(y).tolist())")
    output = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    inputs, targets = addition_dataset().get_batch("train", 6, 12, seed=9, step=123)
    assert output.strip() == f"{to_host(inputs).tolist()} {to_host(targets).tolist()}"


def test_shards_reassemble_the_global_batch():
    inputs, targets = counting_dataset().get_batch("train", 12, 4, seed=0, step=0)
    shards = [local_slice((inputs, targets), rank, 4) for rank in range(4)]
    assert all(part[0].shape == (3, 4) for part in shards)
    assert xp.array_equal(xp.concatenate([part[0] for part in shards]), inputs)
    assert xp.array_equal(xp.concatenate([part[1] for part in shards]), targets)
    with pytest.raises(ConfigError, match="not divisible by dp = 5"):
        local_slice((inputs, targets), 0, 5)


def test_validation_batches_are_fixed():
    dataset = counting_dataset()
    first, second = dataset.validation_batches(4, 8, count=3), dataset.validation_batches(4, 8, count=3)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second):
        assert xp.array_equal(x1, x2) and xp.array_equal(y1, y2) and int(x1.min()) >= 1000
    assert not xp.array_equal(first[0][0], first[1][0])


def test_batch_errors():
    dataset = counting_dataset()
    with pytest.raises(ConfigError, match="split must be one of"):
        dataset.get_batch("test", 2, 4, seed=0, step=0)
    with pytest.raises(DataError, match="the validation split has 200 tokens; block size 200 needs at least 201"):
        dataset.get_batch("validation", 2, 200, seed=0, step=0)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        dataset.get_batch("train", 0, 4, seed=0, step=0)
    with pytest.raises(ConfigError, match="non-negative"):
        dataset.get_batch("train", 2, 4, seed=0, step=-1)
