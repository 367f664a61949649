"""The mixture-of-experts layer (minipar/nn/moe.py) on one process, in float64.

- the routing ops (gather_rows, scatter_add_rows) and the auxiliary-loss op against central
  differences;
- the whole layer's gradient (router, experts, input) and the load-balancing loss's gradient
  against central differences, k = 1 and 2, with and without drops;
- the drop rule against a plain loop that claims slots one choice at a time;
- the output against a token-by-token loop over the experts (no dispatch buffers at all);
- the aux loss equals alpha at perfect balance and exceeds it otherwise;
- G groups equal G separate calls, each counting its own capacity.
"""
import math

import numpy as np
import pytest

from minipar import ops
from minipar.errors import ConfigError, ShapeError
from minipar.gradcheck import check_gradients
from minipar.nn.moe import MixtureOfExperts, expert_capacity, expert_parameter_ids, route
from minipar.tensor import Tensor

rng = np.random.default_rng(0)


def layer(width=6, n_experts=4, top_k=2, capacity_factor=1.0, groups=1, hidden=5, aux=0.1, seed=3, std=0.7):
    moe = MixtureOfExperts(width, n_experts, top_k, capacity_factor, aux, hidden=hidden, groups=groups,
                           aux_loss_in_backward=False)
    return moe.to("float64").reset_parameters(seed, std=std)


# ---- the ops ----------------------------------------------------------------------------------

def test_gather_and_scatter_add_rows_gradients():
    index = np.array([2, -1, 0, 2, 4, -1, 1])
    check_gradients(lambda x: ops.gather_rows(x, index), [rng.standard_normal((5, 3))])
    check_gradients(lambda rows: ops.scatter_add_rows(rows, index, 6), [rng.standard_normal((7, 3))])


def test_gather_and_scatter_add_rows_values():
    x = np.arange(10.0).reshape(5, 2)
    index = np.array([4, -1, 0, 4])
    np.testing.assert_array_equal(ops.gather_rows(Tensor(x), index).data, [[8, 9], [0, 0], [0, 1], [8, 9]])
    summed = ops.scatter_add_rows(Tensor(np.ones((4, 2))), index, 5).data
    np.testing.assert_array_equal(summed, [[1, 1], [0, 0], [0, 0], [0, 0], [2, 2]])
    with pytest.raises(ShapeError, match="out of range"):
        ops.gather_rows(Tensor(x), np.array([5]))
    with pytest.raises(ShapeError, match="integer"):
        ops.scatter_add_rows(Tensor(np.ones((1, 2))), np.array([0.0]), 3)


def test_attached_auxiliary_loss_gets_its_scaled_gradient():
    x, y = rng.standard_normal((3, 4)), rng.standard_normal(5)
    weights = rng.standard_normal((3, 4))
    for scale in (1.0, 0.25):
        xa, ya = Tensor(x, requires_grad=True), Tensor(y, requires_grad=True)
        (ops.attach_auxiliary_loss(xa * 2.0, (ya * ya).sum(), scale) * Tensor(weights)).sum().backward()
        np.testing.assert_allclose(xa.grad, 2.0 * weights, rtol=1e-15)
        np.testing.assert_allclose(ya.grad, scale * 2.0 * y, rtol=1e-15)


# ---- gradients of the layer --------------------------------------------------------------------

def functional(moe):
    """build(x, W_r, W1, b1, W2, b2) -> concatenate(out, aux): the layer with these tensors as its weights."""
    def build(x, router, hidden_w, hidden_b, output_w, output_b):
        moe.router.weight, moe.experts.hidden.weight, moe.experts.hidden.bias = router, hidden_w, hidden_b
        moe.experts.output.weight, moe.experts.output.bias = output_w, output_b
        out = moe(x)
        return ops.concatenate([ops.reshape(out, (-1,)), ops.reshape(moe.aux_loss, (1,))])
    return build


def weights_of(moe):
    return [p.data.copy() for p in (moe.router.weight, moe.experts.hidden.weight, moe.experts.hidden.bias,
                                    moe.experts.output.weight, moe.experts.output.bias)]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.5, 2.0], ids=["drops", "no drops"])
def test_layer_gradients_against_central_differences(top_k, capacity_factor):
    moe = layer(top_k=top_k, capacity_factor=capacity_factor, groups=2)
    x = rng.standard_normal((2, 4, 6))
    moe(Tensor(x))
    dropped = int((moe.routing.routed - moe.routing.kept).sum())
    assert (dropped > 0) == (capacity_factor < 1), f"expected drops only at CF 0.5, got {dropped} dropped choices"
    check_gradients(functional(moe), [x, *weights_of(moe)])


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gradient_of_the_aux_loss_alone(top_k):
    moe = layer(top_k=top_k, groups=2)
    x = rng.standard_normal((4, 3, 6))

    def aux(router):
        moe.router.weight = router
        moe(Tensor(x))
        return ops.reshape(moe.aux_loss, (1,))

    check_gradients(aux, [moe.router.weight.data.copy()])


# ---- routing: capacity and the drop rule --------------------------------------------------------

def test_capacity_formula():
    assert expert_capacity(64, 8, 2, 1.25) == 20  # 1.25 * 2 * 64 / 8
    assert expert_capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(12, 8, 2, 4.0) == 12  # CF = E/k: every token fits
    assert expert_capacity(3, 8, 1, 0.1) == 1  # never fewer than one slot


def route_by_loop(probabilities, top_k, capacity_factor, groups):
    """The drop rule written as plainly as possible: slots claimed one choice at a time."""
    tokens, n_experts = probabilities.shape
    per_group = tokens // groups
    capacity = math.ceil(capacity_factor * top_k * per_group / n_experts - 1e-9)
    slot = -np.ones((tokens, top_k), dtype=int)
    for group in range(groups):
        used = [0] * n_experts
        for choice in range(top_k):  # every first choice before any second choice
            for token in range(group * per_group, (group + 1) * per_group):
                ranking = sorted(range(n_experts), key=lambda e: (-probabilities[token, e], e))
                expert = ranking[choice]
                if used[expert] < capacity:
                    slot[token, choice] = (group * n_experts + expert) * capacity + used[expert]
                    used[expert] += 1
    return slot, capacity


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25, 4.0])
def test_drop_rule_matches_a_plain_loop(groups, top_k, capacity_factor):
    probabilities = rng.dirichlet(np.ones(5) * 0.5, size=12 * groups)
    probabilities[0, :2] = probabilities[0, 2:4] = 0.25  # a tie: the lower expert number wins
    probabilities[0, 4] = 0.0
    routing = route(probabilities, top_k, capacity_factor, groups)
    expected_slot, capacity = route_by_loop(probabilities, top_k, capacity_factor, groups)
    assert routing.capacity == capacity
    np.testing.assert_array_equal(routing.slot, expected_slot)
    assert list(routing.chosen[0, :top_k]) == [0, 1][:top_k]
    filled = routing.token_of_slot >= 0
    assert filled.sum() == (expected_slot >= 0).sum() == routing.kept.sum()
    tokens, choices = np.nonzero(expected_slot >= 0)
    np.testing.assert_array_equal(routing.token_of_slot[expected_slot[tokens, choices]], tokens)
    assert routing.kept.max() <= capacity and routing.routed.sum() == top_k * len(probabilities)


def dense_reference(moe, x):
    """Token by token: out_t = sum over kept choices of gate * expert_e(x_t), with no buffers."""
    tokens = x.reshape(-1, x.shape[-1])
    weights = [p.data for p in (moe.experts.hidden.weight, moe.experts.hidden.bias, moe.experts.output.weight,
                                moe.experts.output.bias)]
    logits = tokens @ moe.router.weight.data
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    slot, _ = route_by_loop(probabilities, moe.top_k, moe.capacity_factor, moe.groups)
    out = np.zeros_like(tokens)
    for t, token in enumerate(tokens):
        ranking = sorted(range(moe.n_experts), key=lambda e: (-probabilities[t, e], e))[:moe.top_k]
        gates = probabilities[t, ranking] / (probabilities[t, ranking].sum() if moe.top_k > 1 else 1.0)
        for choice, (expert, gate) in enumerate(zip(ranking, gates)):
            if slot[t, choice] >= 0:
                hidden = ops.gelu(Tensor(token @ weights[0][expert] + weights[1][expert])).data
                out[t] += gate * (hidden @ weights[2][expert] + weights[3][expert])
    return out.reshape(x.shape)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.75, 2.0])
def test_output_matches_a_token_by_token_loop(top_k, capacity_factor):
    moe = layer(top_k=top_k, capacity_factor=capacity_factor, groups=2)
    x = rng.standard_normal((4, 5, 6))
    np.testing.assert_allclose(moe(Tensor(x)).data, dense_reference(moe, x), rtol=1e-12, atol=1e-14)


def test_groups_equal_separate_calls():
    grouped, single = layer(groups=3, capacity_factor=0.75), layer(groups=1, capacity_factor=0.75)
    x = rng.standard_normal((6, 4, 6))
    together = grouped(Tensor(x)).data
    apart = np.concatenate([single(Tensor(part)).data for part in np.split(x, 3)])
    np.testing.assert_allclose(together, apart, rtol=1e-13, atol=1e-15)


# ---- the load-balancing loss --------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_is_alpha_at_perfect_balance(top_k):
    n_experts, alpha = 4, 0.01
    moe = MixtureOfExperts(n_experts, n_experts, top_k, 2.0, alpha, hidden=3, aux_loss_in_backward=False).to("float64")
    moe.router.weight.data[...] = 3.0 * np.eye(n_experts)
    # Token t prefers expert t mod E (and, for k = 2, then t+1): every expert is chosen equally
    # often and, by symmetry, has the same mean probability 1/E.
    x = np.zeros((2, n_experts, n_experts))
    for t in range(n_experts):
        x[:, t, t] = 1.0
        if top_k == 2:
            x[:, t, (t + 1) % n_experts] = 0.5
    moe(Tensor(x))
    assert np.all(moe.routing.routed == 2 * top_k), moe.routing.routed
    assert moe.aux_loss.item() == pytest.approx(alpha, rel=1e-14)
    x[:, :, :] = 0.0
    x[:, :, 0] = 1.0  # every token prefers expert 0
    moe(Tensor(x))
    assert moe.aux_loss.item() > 1.5 * alpha


def test_aux_loss_in_backward_gives_the_same_gradients_as_adding_it():
    x = rng.standard_normal((2, 3, 6))
    explicit = layer()
    out = explicit(Tensor(x))
    (out.sum() + explicit.aux_loss).backward()
    attached = layer()
    attached.aux_loss_in_backward = True
    attached(Tensor(x)).sum().backward()
    for (name, a), b in zip(explicit.named_parameters(), attached.parameters()):
        np.testing.assert_allclose(b.grad, a.grad, rtol=1e-14, atol=1e-16, err_msg=name)
    assert attached.aux_loss.item() == pytest.approx(explicit.aux_loss.item(), rel=1e-15)


def test_expert_parameters_and_bad_configs():
    moe = layer()
    names = {name for name, p in moe.named_parameters() if id(p) in expert_parameter_ids(moe)}
    assert names == {"experts.hidden.weight", "experts.hidden.bias", "experts.output.weight", "experts.output.bias"}
    for bad in (dict(n_experts=0), dict(top_k=3), dict(n_experts=1, top_k=2), dict(capacity_factor=0),
                dict(aux_loss_weight=-1.0)):
        options = dict(width=4, n_experts=4) | bad
        with pytest.raises(ConfigError):
            MixtureOfExperts(**options)
    with pytest.raises(ShapeError, match="do not split into 4 equal groups"):
        layer(groups=4)(Tensor(rng.standard_normal((3, 2, 6))))



def test_use_experts_in_a_gpt():
    from minipar.nn.gpt import GPT, GPTConfig
    from minipar.nn.moe import use_experts

    def model_with(aux_loss_weight):
        config = GPTConfig(vocab_size=13, block_size=6, n_layer=2, n_head=2, n_embd=8)
        return use_experts(GPT(config, dtype="float64"), n_experts=4, top_k=2, aux_loss_weight=aux_loss_weight)

    model = model_with(0.01)
    names = [name for name, _ in model.named_parameters()]
    assert "blocks.1.mlp.experts.output.weight" in names and not any(".mlp.hidden." in name for name in names)
    assert all(p.name == name for name, p in model.named_parameters() if ".mlp." in name)
    assert all(p.dtype == np.float64 for p in model.parameters())
    assert 0.005 < model.blocks[1].mlp.experts.output.weight.data.std() < 0.015  # 0.02 / sqrt(2 n_layer) = 0.01
    ids = rng.integers(0, 13, (3, 6))
    plain = model_with(0.0)
    _, loss = model(ids, ids)
    _, plain_loss = plain(ids, ids)
    loss.backward()
    plain_loss.backward()
    # The loss value is the cross-entropy alone, but the aux loss's gradient reaches the router.
    assert loss.item() == plain_loss.item()
    for block, plain_block in zip(model.blocks, plain.blocks):
        assert block.mlp.aux_loss.item() > 0.0 and plain_block.mlp.aux_loss.item() == 0.0
        difference = np.abs(block.mlp.router.weight.grad - plain_block.mlp.router.weight.grad).max()
        assert difference > 1e-6, f"the aux loss changed the router's gradient by only {difference}"
    # Nothing of the last block's aux loss flows into its own experts (earlier blocks' do get some).
    np.testing.assert_array_equal(model.blocks[-1].mlp.experts.hidden.weight.grad,
                                  plain.blocks[-1].mlp.experts.hidden.weight.grad)


def test_evaluation_never_drops():
    moe = layer(capacity_factor=0.5, groups=2)
    x = rng.standard_normal((4, 5, 6))
    moe(Tensor(x))
    assert (moe.routing.routed > moe.routing.kept).any()
    moe.eval()
    together = moe(Tensor(x)).data
    assert np.array_equal(moe.routing.routed, moe.routing.kept) and moe.routing.capacity == 20
    alone = np.concatenate([moe(Tensor(x[i:i + 1])).data for i in range(4)])  # batch-independent
    np.testing.assert_allclose(together, alone, rtol=1e-13, atol=1e-15)
