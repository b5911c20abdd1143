"""retrieve_topk / topk_target_attention: every backend against the float64 reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reclora_kernels as rk
from reclora_kernels.retrieval_reference import retrieve_topk_reference
from tests.backends import interpreted, kernel_backends
from tests.tolerance import assert_within_tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(batch, length, dim, *, table_rows=None, dim_v=None, lengths=False, mask=False, integer=False, seed=0):
    """float64 inputs on CPU. table_rows: keys (and values) are a table read through ids."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        if integer:  # small integers: exact scores, so ties are exact ties
            return torch.randint(-2, 3, size, generator=gen).double()
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    inputs = {"query": rand(batch, dim)}
    rows = (table_rows,) if table_rows else (batch, length)
    inputs["keys"] = rand(*rows, dim)
    if dim_v is not None:
        inputs["values"] = rand(*rows, dim_v)
    if table_rows:
        inputs["ids"] = torch.randint(0, table_rows, (batch, length), generator=gen)
    if lengths:
        inputs["lengths"] = torch.randint(0, length + 1, (batch,), generator=gen)
        inputs["lengths"][0] = length  # one full row
        if batch > 1:
            inputs["lengths"][1] = 0  # one empty row
    if mask:
        inputs["mask"] = torch.rand(batch, length, generator=gen) > 0.3
        if batch > 2:
            inputs["mask"][2] = False  # one fully masked row
    return inputs


def run(op, inputs, k, backend, device, dtype, scale, seed=1):
    """Outputs, index and the gradients of every float input, for sum(out * grad_out)."""
    leaves, args = {}, {}
    for name, value in inputs.items():
        if name == "values" and op is rk.retrieve_topk:
            continue
        if value.is_floating_point():
            leaves[name] = value.detach().to(device=device, dtype=dtype).requires_grad_()
            args[name] = leaves[name]
        else:
            args[name] = value.to(device)
    out, index = op(k=k, scale=scale, backend=backend, **args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    usable = torch.isfinite(out)
    (torch.where(usable, out, 0) * grad_out.to(device=device, dtype=out.dtype)).sum().backward()
    grads = {n: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for n, leaf in leaves.items()}
    return out.detach(), index, grads


def check_against_reference(op, inputs, k, backend, device, dtype, scale=0.7, exact_index=False):
    out, index, grads = run(op, inputs, k, backend, device, dtype, scale)
    rounded = {n: v.to(dtype).double() if v.is_floating_point() else v for n, v in inputs.items()}
    out64, index64, grads64 = run(op, rounded, k, "torch", "cpu", torch.float64, scale)
    out_same, _, grads_same = run(op, inputs, k, "torch", "cpu", dtype, scale)
    index = index.cpu()
    assert index.dtype == torch.int64 and index.shape == index64.shape
    if exact_index:
        assert torch.equal(index, index64)
    else:
        assert_same_selection(rounded, index, index64, scale)
    if op is rk.retrieve_topk:
        assert out.dtype == torch.float32
    assert_within_tolerance("output", out.cpu(), out64, out_same, dtype)
    for name in grads64:
        assert grads[name].dtype == dtype, name
        assert_within_tolerance(f"grad {name}", grads[name].cpu(), grads64[name], grads_same[name], dtype)


def assert_same_selection(inputs, index, index64, scale):
    """Same missing slots, and the chosen positions score like the reference's (equal up to exact ties)."""
    assert torch.equal(index < 0, index64 < 0)
    keys = inputs["keys"] if "ids" not in inputs else inputs["keys"][inputs["ids"]]
    scores = scale * torch.einsum("bd,bld->bl", inputs["query"], keys)
    if scores.shape[1] == 0:
        return  # nothing to select: every slot is missing, checked above
    picked = torch.gather(scores, 1, index.clamp(min=0))
    expected = torch.gather(scores, 1, index64.clamp(min=0))
    assert torch.allclose(picked[index >= 0], expected[index >= 0], rtol=1e-5, atol=1e-5)


OPS = [pytest.param(rk.retrieve_topk, id="retrieve_topk"), pytest.param(rk.topk_target_attention, id="attention")]
# (B, L, d, k, table_rows, d_v)
CASES = [
    (1, 1, 5, 1, None, None),
    (3, 7, 33, 3, None, None),
    (4, 20, 16, 8, None, 6),
    (4, 20, 33, 5, 11, None),
    (5, 30, 64, 7, 9, 13),
    (2, 3, 8, 6, None, None),  # k > L
]


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("filters", ["none", "lengths", "mask", "both"])
def test_matches_reference(backend, device, op, dtype, case, filters):
    batch, length, dim, k, table_rows, dim_v = case
    inputs = make_inputs(
        batch,
        length,
        dim,
        table_rows=table_rows,
        dim_v=dim_v,
        lengths=filters in ("lengths", "both"),
        mask=filters in ("mask", "both"),
    )
    check_against_reference(op, inputs, k, backend, device, dtype)


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("table_rows", [None, 4])
def test_ties_go_to_smaller_position(backend, device, op, table_rows):
    inputs = make_inputs(6, 25, 3, table_rows=table_rows, integer=True, lengths=True)
    check_against_reference(op, inputs, 10, backend, device, torch.float32, scale=1.0, exact_index=True)


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
@pytest.mark.parametrize("op", OPS)
def test_repeated_ids_accumulate(backend, device, op):
    """Rows selected several times (within a row and across rows) sum their gradients."""
    inputs = make_inputs(4, 12, 6, table_rows=3, dim_v=5)
    inputs["ids"][0] = 1  # every position of row 0 reads table row 1
    check_against_reference(op, inputs, 6, backend, device, torch.float32)


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
def test_gradients_are_deterministic(backend, device):
    inputs = make_inputs(8, 40, 16, table_rows=5, dim_v=7)
    runs = [run(rk.topk_target_attention, inputs, 9, backend, device, torch.float32, 0.5)[2] for _ in range(2)]
    torch.use_deterministic_algorithms(True)
    try:
        runs += [run(rk.topk_target_attention, inputs, 9, backend, device, torch.float32, 0.5)[2] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for name in runs[0]:
        assert torch.equal(runs[2][name], runs[3][name]), name
        torch.testing.assert_close(runs[0][name], runs[2][name])


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
@pytest.mark.parametrize("op", OPS)
def test_empty_and_masked_rows_give_zeros_not_nan(backend, device, op):
    inputs = make_inputs(3, 5, 4, lengths=True, mask=True)
    inputs["lengths"][:] = torch.tensor([0, 5, 5])
    inputs["mask"][1] = False
    out, index, grads = run(op, inputs, 3, backend, device, torch.float32, 1.0)
    assert (index[:2] == -1).all()
    if op is rk.topk_target_attention:
        assert torch.equal(out[:2].cpu(), torch.zeros(2, 4))
    else:
        assert torch.isneginf(out[:2]).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert torch.count_nonzero(grads["query"][:2]) == 0


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
@pytest.mark.parametrize("op", OPS)
def test_no_positions(backend, device, op):
    """L = 0: every slot is missing."""
    inputs = make_inputs(2, 0, 4)
    out, index, _ = run(op, inputs, 2, backend, device, torch.float32, 1.0)
    assert index.shape == (2, 2) and (index == -1).all()


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
@pytest.mark.parametrize("op", OPS)
def test_large_k(backend, device, op):
    length = 300 if not interpreted(backend, device) else 260
    inputs = make_inputs(2, length, 8, table_rows=50, lengths=True)
    check_against_reference(op, inputs, 256, backend, device, torch.float32)


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("table_rows", [None, 6])
@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_wider_than_a_block(backend, device, op, table_rows, deterministic):
    """d = 300 and d_v = 257, past the CUDA kernels' 256 threads: a thread takes several elements of a
    slot's row, and the next slot's start within its share (scatter_rows steps through rows and
    elements without dividing)."""
    inputs = make_inputs(3, 9, 300, table_rows=table_rows, dim_v=257, lengths=True)
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_against_reference(op, inputs, 4, backend, device, torch.float32)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
@given(
    batch=st.integers(1, 5),
    length=st.integers(0, 40),
    dim=st.integers(1, 40),
    k=st.integers(1, 45),
    table=st.booleans(),
    separate_values=st.booleans(),
    lengths=st.booleans(),
    mask=st.booleans(),
    attention=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(backend, device, batch, length, dim, k, table, separate_values, lengths, mask, attention, seed):
    inputs = make_inputs(
        batch,
        length,
        dim,
        table_rows=7 if table else None,
        dim_v=3 if separate_values else None,
        lengths=lengths,
        mask=mask,
        seed=seed,
    )
    op = rk.topk_target_attention if attention else rk.retrieve_topk
    check_against_reference(op, inputs, k, backend, device, torch.float32)


def test_reference_tie_rule_and_padding():
    query = torch.tensor([[1.0]])
    keys = torch.tensor([[[2.0], [3.0], [2.0], [3.0]]])
    scores, index = retrieve_topk_reference(query, keys, 6, lengths=torch.tensor([3]))
    assert index.tolist() == [[1, 0, 2, -1, -1, -1]]
    assert scores[0, :3].tolist() == [3.0, 2.0, 2.0] and torch.isneginf(scores[0, 3:]).all()


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval"))
def test_opcheck(backend, device):
    inputs = make_inputs(3, 10, 6, table_rows=8, dim_v=5, lengths=True, mask=True)
    t = {
        n: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
        for n, v in inputs.items()
    }
    query, keys, values = (t[n].requires_grad_() for n in ("query", "keys", "values"))
    common = (t["ids"], t["lengths"], t["mask"], 4, 0.5)
    torch.library.opcheck(torch.ops.reclora.retrieve_topk.default, (query, keys) + common + (backend,))
    torch.library.opcheck(torch.ops.reclora.topk_target_attention.default, (query, keys, values) + common + (backend,))
    dense = torch.randn(3, 10, 6, device=device, requires_grad=True)
    torch.library.opcheck(
        torch.ops.reclora.topk_target_attention.default, (query, dense, dense, None, None, None, 4, 0.5, backend)
    )
    if backend in ("cpu", "cuda"):
        q, kt, vt = query.detach(), keys.detach(), values.detach()
        scores, index = torch.ops.reclora.retrieve_topk_forward(q, kt, *common)
        torch.library.opcheck(torch.ops.reclora.retrieve_topk_forward.default, (q, kt) + common)
        torch.library.opcheck(
            torch.ops.reclora.retrieve_topk_backward.default, (torch.randn_like(scores), q, kt, t["ids"], index, 0.5)
        )
        _, index, probs = torch.ops.reclora.topk_attention_forward(q, kt, vt, *common)
        torch.library.opcheck(torch.ops.reclora.topk_attention_forward.default, (q, kt, vt) + common)
        grad = torch.randn(3, 5, device=device)
        torch.library.opcheck(
            torch.ops.reclora.topk_attention_backward.default, (grad, q, kt, vt, t["ids"], index, probs, 0.5)
        )


def _bad(**changes):
    inputs = {n: v.float() if v.is_floating_point() else v for n, v in make_inputs(2, 6, 4, table_rows=5).items()}
    inputs.update(k=3)
    inputs.update(changes)
    return inputs


BAD_INPUTS = [
    (dict(query=torch.zeros(2, 3)), ValueError, r"keys must have shape \(\*, 3\)"),
    (dict(query=torch.zeros(2)), ValueError, "query must have 2 dimensions"),
    (dict(k=0), ValueError, "k must be an int >= 1"),
    (dict(k=2.0), ValueError, "k must be an int >= 1"),
    (dict(ids=torch.full((2, 6), 5)), ValueError, r"ids must hold rows of keys in \[0, 5\)"),
    (dict(ids=torch.full((2, 6), -1)), ValueError, r"ids must hold rows of keys in \[0, 5\)"),
    (dict(ids=torch.zeros(2, 6, dtype=torch.int32)), TypeError, "ids must have dtype int64"),
    (dict(ids=torch.zeros(3, 6, dtype=torch.int64)), ValueError, r"ids must have shape \(2, \*\)"),
    (dict(keys=torch.zeros(5, 4, dtype=torch.float16)), TypeError, "keys must have the same dtype as query"),
    (dict(lengths=torch.tensor([7, 1])), ValueError, r"lengths must hold valid prefix lengths in \[0, 7\)"),
    (dict(lengths=torch.tensor([-1, 1])), ValueError, r"lengths must hold valid prefix lengths in \[0, 7\)"),
    (dict(lengths=torch.tensor([1.0, 1.0])), TypeError, "lengths must have dtype int64 or int32"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 6\)"),
    (dict(mask=torch.ones(2, 6)), TypeError, "mask must have dtype bool"),
    (dict(scale=torch.tensor(1.0)), TypeError, "scale must be a Python float"),
    (dict(backend="gpu"), ValueError, "backend must be None or one of"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS)
@pytest.mark.parametrize("op", OPS)
def test_bad_input_is_named(op, changes, error, message):
    with pytest.raises(error, match=message):
        op(**_bad(**changes))


def test_bad_values_and_padding_ids():
    with pytest.raises(ValueError, match=r"ids must hold rows of values in \[0, 2\)"):
        rk.topk_target_attention(**_bad(values=torch.zeros(2, 3)))
    # ids past a row's length are padding and never read: any value is accepted there
    inputs = _bad(lengths=torch.tensor([2, 6]))
    inputs["ids"][0, 2:] = -7
    rk.retrieve_topk(**inputs)
    dense = {"query": torch.zeros(2, 4), "keys": torch.zeros(2, 6, 4), "k": 2}
    with pytest.raises(ValueError, match=r"values must have shape \(2, 6, \*\)"):
        rk.topk_target_attention(**dense, values=torch.zeros(2, 5, 3))


@pytest.mark.parametrize("backend,device", kernel_backends("retrieval")[:2])
def test_torch_compile_fullgraph(backend, device):
    inputs = make_inputs(3, 10, 6, table_rows=8, dim_v=5, lengths=True, mask=True)
    t = {
        n: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
        for n, v in inputs.items()
    }

    def pool(query, keys, values, ids, lengths, mask):
        return rk.topk_target_attention(
            query, keys, 4, values=values, lengths=lengths, mask=mask, ids=ids, backend=backend
        )

    args = [t[n] for n in ("query", "keys", "values", "ids", "lengths", "mask")]
    compiled = torch.compile(pool, fullgraph=True)
    for got, expected in zip(compiled(*args), pool(*args)):
        torch.testing.assert_close(got, expected)


ALL_BACKENDS = [pytest.param("torch", "cpu", id="torch"), *kernel_backends("retrieval")]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("separate_values", [False, True])
def test_no_positions_still_differentiable(backend, device, separate_values):
    """L = 0 pools zeros that are a function of every input: backward runs and gives zero gradients."""
    inputs = make_inputs(2, 0, 4, dim_v=3 if separate_values else None)
    out, index, grads = run(rk.topk_target_attention, inputs, 2, backend, device, torch.float32, 1.0)
    assert torch.equal(out.cpu(), torch.zeros(2, 3 if separate_values else 4)) and (index == -1).all()
    assert torch.count_nonzero(grads["query"]) == 0


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_valid_items_scoring_minus_infinity_come_before_masked_ones(backend, device, op):
    """Every valid score -inf under a mask: the valid positions are selected (by position), masked ones never."""
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]], device=device)
    keys = torch.tensor(
        [
            [[-float("inf"), 0.0], [-float("inf"), 0.0], [1.0, 0.0]],
            [[-float("inf"), 0.0], [1.0, 0.0], [-float("inf"), 0.0]],
        ],
        device=device,
    )
    mask = torch.tensor([[False, True, False], [True, False, True]], device=device)
    _, index = op(query, keys, 3, mask=mask, scale=1.0, backend=backend)
    assert index.cpu().tolist() == [[1, -1, -1], [0, 2, -1]]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_an_empty_table_is_accepted_when_every_position_is_masked(backend, device, op):
    query = torch.randn(2, 4, device=device)
    table = torch.zeros(0, 4, device=device)
    ids = torch.zeros(2, 3, dtype=torch.int64, device=device)
    for filters in (
        dict(lengths=torch.zeros(2, dtype=torch.int64, device=device)),
        dict(mask=torch.zeros(2, 3, dtype=torch.bool, device=device)),
    ):
        out, index = op(query, table, 2, ids=ids, backend=backend, **filters)
        assert (index == -1).all()
        if op is rk.topk_target_attention:
            assert torch.equal(out.cpu(), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"ids must hold rows of keys in \[0, 0\)"):
        op(query, table, 2, ids=ids, lengths=torch.tensor([0, 1], device=device), backend=backend)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_zero_width_keys(backend, device):
    """d = 0: every score is 0 (ties to the smaller position); the default scale 1/sqrt(d) does not exist."""
    query, keys = torch.zeros(2, 0, device=device), torch.zeros(2, 3, 0, device=device)
    scores, index = rk.retrieve_topk(query, keys, 2, backend=backend)
    assert torch.equal(scores.cpu(), torch.zeros(2, 2)) and index.cpu().tolist() == [[0, 1], [0, 1]]
    values = torch.arange(6.0, device=device).view(2, 3, 1)
    pooled, _ = rk.topk_target_attention(query, keys, 2, values=values, scale=1.0, backend=backend)
    assert torch.allclose(pooled.cpu(), torch.tensor([[0.5], [3.5]]))
    with pytest.raises(ValueError, match=r"query has d = 0 features: pass scale"):
        rk.topk_target_attention(query, keys, 2, values=values, backend=backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("k", [2**31, 2**40])
def test_a_k_beyond_int32_is_named(op, k):
    with pytest.raises(ValueError, match=rf"k must be an int >= 1 and < 2\*\*31, got {k}"):
        op(**_bad(k=k))
