"""nn modules and the GPT: gradients, reproducible init, state dicts, config validation, layering."""
import ast
from pathlib import Path

import numpy as np
import pytest

import minipar.nn
from minipar.backend import set_default_dtype
from minipar.errors import CheckpointError, ConfigError
from minipar.nn.gpt import GPT, GPTConfig

TINY = dict(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8)


@pytest.fixture
def float64():
    set_default_dtype(np.float64)
    yield
    set_default_dtype(np.float32)


def test_same_seed_same_model_different_seed_different_model():
    a, b = GPT(GPTConfig(**TINY, seed=3)), GPT(GPTConfig(**TINY, seed=3))
    c = GPT(GPTConfig(**TINY, seed=4))
    triples = zip(a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True)
    for (name, pa), (_, pb), (_, pc) in triples:
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=name)
        if name.endswith("weight") and "norm" not in name:
            assert not np.array_equal(pa.data, pc.data), name


def test_gpt2_initialisation_statistics():
    config = GPTConfig(n_layer=4, n_embd=128, n_head=4)
    state = GPT(config).state_dict()
    assert abs(state["blocks.0.mlp.hidden.weight"].std() - 0.02) < 0.001
    assert abs(state["blocks.0.mlp.output.weight"].std() - 0.02 / np.sqrt(8)) < 0.0005
    assert np.all(state["blocks.1.attention_norm.weight"] == 1) and np.all(state["blocks.1.mlp.hidden.bias"] == 0)


def test_initial_loss_is_near_log_vocab():
    model = GPT(GPTConfig(**TINY))
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, 7, (4, 6)), rng.integers(0, 7, (4, 6))
    _, loss = model(ids, targets)
    assert abs(loss.item() - np.log(7)) < 0.1


def test_gpt_gradients_match_finite_differences(float64):
    model = GPT(GPTConfig(**TINY))
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, 7, (2, 5)), rng.integers(0, 7, (2, 5))
    model(ids, targets)[1].backward()
    step = 1e-6
    for name, p in model.named_parameters():
        flat = p.data.reshape(-1)
        for i in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            original = flat[i]
            flat[i] = original + step
            plus = model(ids, targets)[1].item()
            flat[i] = original - step
            minus = model(ids, targets)[1].item()
            flat[i] = original
            numerical = (plus - minus) / (2 * step)
            assert abs(p.grad.reshape(-1)[i] - numerical) < 1e-7 + 1e-5 * abs(numerical), (name, i)


def test_attention_is_causal_in_the_whole_model(float64):
    model = GPT(GPTConfig(**TINY))
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    changed = ids.copy()
    changed[0, 4:] = 0
    np.testing.assert_allclose(model(ids)[0].data[:, :4], model(changed)[0].data[:, :4], rtol=1e-12)


def test_state_dict_round_trip_and_errors():
    a, b = GPT(GPTConfig(**TINY, seed=1)), GPT(GPTConfig(**TINY, seed=2))
    b.load_state_dict(a.state_dict())
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_array_equal(pa.data, pb.data)
    state = a.state_dict()
    state["head.norm.weight"] = np.ones(99)
    with pytest.raises(CheckpointError, match=r"head.norm.weight.*\(99,\)"):
        b.load_state_dict(state)
    del state["head.norm.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        b.load_state_dict(state)


def test_tied_head_gets_gradient_from_both_uses(float64):
    model = GPT(GPTConfig(**TINY))
    ids = np.array([[1, 2, 3]])
    model(ids, ids)[1].backward()
    grad = model.embedding.token.weight.grad
    assert np.abs(grad[0]).sum() > 0  # token 0 never appears in the input: only the head gives it a gradient


def test_config_validation():
    with pytest.raises(ConfigError, match=r"n_embd \(10\).*n_head \(4\)"):
        GPTConfig(n_embd=10, n_head=4)
    with pytest.raises(ConfigError, match=r"unknown GPTConfig keys \['n_layers'\]; valid keys are"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(ConfigError, match="n_layer must be int"):
        GPTConfig(n_layer="4")
    with pytest.raises(ConfigError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="block_size"):
        GPT(GPTConfig(**TINY)).embedding(np.zeros((1, 7), dtype=np.int64))


def test_generate_extends_the_sequence():
    model = GPT(GPTConfig(**TINY))
    out = model.generate(np.array([[1, 2]]), max_new_tokens=7, seed=0)
    assert out.shape == (1, 9) and out.min() >= 0 and out.max() < 7
    np.testing.assert_array_equal(out, model.generate(np.array([[1, 2]]), max_new_tokens=7, seed=0))


def test_dropout_only_in_training():
    model = GPT(GPTConfig(**TINY, dropout=0.5))
    ids = np.array([[1, 2, 3]])
    model.eval()
    np.testing.assert_array_equal(model(ids)[0].data, model(ids)[0].data)
    model.train()
    assert not np.array_equal(model(ids)[0].data, model(ids)[0].data)


def test_generation_never_emits_vocabulary_padding():
    model = GPT(GPTConfig(**{**TINY, "vocab_size": 8}))
    model.head.token_weight.data[5:] *= 50.0  # make the padding rows (ids 5..7) the likeliest
    for greedy in (True, False):
        out = model.generate(np.array([[1, 2]]), max_new_tokens=20, seed=1, greedy=greedy, num_tokens=5)
        assert out[:, 2:].max() < 5
    assert model.generate(np.array([[1, 2]]), max_new_tokens=20, seed=1, greedy=True)[:, 2:].max() >= 5


def test_nn_knows_nothing_of_parallelism():
    """Layers point one way (backend -> autograd -> nn -> parallel): nn imports no parallel code, no MPI."""
    forbidden = ("minipar.parallel", "minipar.comm", "minipar.train", "mpi4py")
    found = []
    for path in sorted(Path(minipar.nn.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {name}" for name in names if name.startswith(forbidden)]
    assert found == [], f"nn imports parallel code: {found}"


def test_parameters_carry_their_model_name_and_no_shard():
    """The parallel side attaches ``shard``; the model only names its parameters."""
    model = GPT(GPTConfig(**TINY))
    names = [(name, p.name) for name, p in model.named_parameters() if p.name != name]
    assert names == [], f"(name in the model, p.name) that differ: {names}"
    assert not any(hasattr(p, "shard") for p in model.parameters()), "a plain GPT's parameter has a shard"



@pytest.mark.parametrize("bias", [True, False])
def test_the_mlp_takes_the_product_and_the_bias_from_its_hidden_layer_whatever_its_type(float64, bias):
    """The MLP adds the hidden bias inside GELU's pass (bias_gelu), asking the layer for x W and b:
    a layer with work of its own before the bias (a parallel one's f) keeps it, whatever its class."""
    from minipar import ops
    from minipar.nn.layers import MLP, Layers, Linear
    from minipar.tensor import Tensor

    class DoublingLinear(Linear):  # its own step before the bias, as ColumnParallelLinear has f
        def product_and_bias(self, x):
            product, b = super().product_and_bias(x)
            return product * 2.0, b

    class DoublingLayers(Layers):
        def linear_from_stream(self, in_features, out_features, bias=True, blocks=1):
            return DoublingLinear(in_features, out_features, bias)

    rng = np.random.default_rng(0)
    mlp = MLP(4, bias=bias, layers=DoublingLayers())
    for p in mlp.parameters():
        p.data[...] = rng.normal(size=p.shape)
    x = rng.normal(size=(2, 3, 4))
    hidden = 2.0 * x @ mlp.hidden.weight.data + (mlp.hidden.bias.data if bias else 0.0)
    expected = ops.linear(ops.gelu(Tensor(hidden)), mlp.output.weight, mlp.output.bias)
    np.testing.assert_allclose(mlp(Tensor(x)).data, expected.data, rtol=1e-12, atol=1e-12)
