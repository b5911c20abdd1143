"""gated_lora / gated_lora_linear: every backend against the float64 reference, forward and backward."""

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reclora_kernels as rk
from reclora_kernels.gated_lora_reference import gated_lora_reference
from tests.backends import interpreted, kernel_backends
from tests.cuda_emulation import kernels as cuda_emulation
from tests.tolerance import assert_within_tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, K, r, d_in, d_out): K = 1, r < 8, d not a multiple of 16, T = 1, B = 1
SHAPES = [
    (1, 1, 1, 1, 5, 7),
    (2, 3, 1, 3, 33, 17),
    (3, 5, 4, 8, 130, 65),
    (2, 4, 16, 16, 64, 48),
    (1, 7, 3, 3, 16, 16),
]


def make_inputs(shape, *, packed=False, linear=False, bias=True, softmax_gate=True, seed=0):
    """float64 inputs on CPU. packed: tokens in random order, one sample owning none."""
    batch, tokens, num_loras, rank, d_in, d_out = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, std=1.0):
        return torch.randn(*size, generator=gen, dtype=torch.float64) * std

    gate = randn(batch, num_loras)
    inputs = {
        "gate": torch.softmax(gate, -1) if softmax_gate else gate,
        "lora_a": randn(num_loras, rank, d_in, std=d_in**-0.5),
        "lora_b": randn(num_loras, d_out, rank, std=rank**-0.5),
    }
    if packed:
        owners = torch.arange(batch).repeat_interleave(tokens)
        if batch > 1:
            owners = owners[owners != batch - 1]  # the last sample owns no token
        owners = owners[torch.randperm(owners.numel(), generator=gen)]
        inputs["x"] = randn(owners.numel(), d_in)
        inputs["sample_index"] = owners
    else:
        inputs["x"] = randn(batch, tokens, d_in)
    if linear:
        inputs["weight"] = randn(d_out, d_in, std=d_in**-0.5)
        inputs["bias"] = randn(d_out) if bias else None
    return inputs


def run(inputs, backend, device, dtype, mix, scaling=2.0, seed=1):
    """Output and the gradients of every float input, for sum(out * grad_out)."""
    leaves = {}
    args = {}
    for name, value in inputs.items():
        if value is None or not value.is_floating_point():
            args[name] = None if value is None else value.to(device)
            continue
        # the gate is the CRM's float32 softmax in practice; the kernels take it in float32
        cast = torch.float64 if dtype == torch.float64 else (torch.float32 if name == "gate" else dtype)
        leaves[name] = value.detach().to(device=device, dtype=cast).requires_grad_()
        args[name] = leaves[name]
    fn = rk.gated_lora_linear if "weight" in args else rk.gated_lora
    out = fn(**args, scaling=scaling, mix=mix, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out * grad_out.to(device=device, dtype=out.dtype)).sum().backward()
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def check_against_reference(inputs, backend, device, dtype, mix):
    out, grads = run(inputs, backend, device, dtype, mix)
    out64, grads64 = run(inputs, "torch", "cpu", torch.float64, mix)
    out_same, grads_same = run(inputs, "torch", "cpu", dtype, mix)
    assert out.dtype == dtype
    assert_within_tolerance("output", out.cpu(), out64, out_same, dtype)
    for name in grads64:
        assert grads[name].dtype == inputs_dtype(name, dtype), name
        assert_within_tolerance(f"grad {name}", grads[name].cpu(), grads64[name], grads_same[name], dtype)


def inputs_dtype(name, dtype):
    return torch.float32 if name == "gate" else dtype


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", ["weight", "output"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_lora_matches_reference(backend, device, dtype, mix, shape):
    if interpreted(backend, device) and dtype == torch.float16 and shape[3] == 16:
        pytest.skip("interpreter budget: fp16 at r=16 is covered on GPU")
    check_against_reference(make_inputs(shape), backend, device, dtype, mix)


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", ["weight", "output"])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_lora_linear_matches_reference(backend, device, dtype, mix, bias):
    for shape in SHAPES[:3]:
        check_against_reference(make_inputs(shape, linear=True, bias=bias), backend, device, dtype, mix)


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
@pytest.mark.parametrize("mix", ["weight", "output"])
@pytest.mark.parametrize("linear", [False, True])
def test_packed_tokens_with_empty_sample(backend, device, mix, linear):
    inputs = make_inputs((4, 3, 3, 5, 21, 11), packed=True, linear=linear)
    check_against_reference(inputs, backend, device, torch.float32, mix)


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
def test_one_token_per_sample_and_raw_gate(backend, device):
    """x: (B, d_in); the gate need not be a softmax."""
    inputs = make_inputs((5, 1, 4, 2, 19, 23), softmax_gate=False)
    inputs["x"] = inputs["x"][:, 0]
    check_against_reference(inputs, backend, device, torch.float32, "weight")


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
@pytest.mark.parametrize("mix", ["weight", "output"])
@pytest.mark.parametrize("batch", [0, 3])
def test_no_tokens(backend, device, mix, batch):
    """M = 0 (no token, or no sample): empty output, zero gradients for the factors."""
    inputs = make_inputs((max(batch, 1), 2, 2, 3, 9, 6), linear=True)
    inputs["gate"] = inputs["gate"][:batch]
    inputs["x"] = inputs["x"].new_zeros(0, 9)
    inputs["sample_index"] = torch.zeros(0, dtype=torch.int64)
    out, grads = run(inputs, backend, device, torch.float32, mix)
    assert out.shape == (0, 6)
    assert grads["gate"].shape == (batch, 2)
    for name in ("gate", "lora_a", "lora_b", "weight", "bias"):
        assert torch.count_nonzero(grads[name]) == 0, name


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 5),
    num_loras=st.integers(1, 5),
    rank=st.integers(1, 9),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    mix=st.sampled_from(["weight", "output"]),
    linear=st.booleans(),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(backend, device, batch, tokens, num_loras, rank, d_in, d_out, mix, linear, packed, seed):
    shape = (batch, tokens, num_loras, rank, d_in, d_out)
    inputs = make_inputs(shape, packed=packed, linear=linear, seed=seed)
    check_against_reference(inputs, backend, device, torch.float32, mix)


def test_reference_matches_per_sample_definition():
    """The reference's concatenated form equals the literal per-sample matrices (and cross terms)."""
    inputs = make_inputs((3, 4, 5, 3, 7, 6), packed=True)
    x, gate, a, b, ids = (inputs[n] for n in ("x", "gate", "lora_a", "lora_b", "sample_index"))
    for output_mix in (False, True):
        expected = torch.stack(
            [
                (
                    sum(g * (bk @ (ak @ xm)) for g, ak, bk in zip(gate[s], a, b))
                    if output_mix
                    else torch.einsum("k,kor->or", gate[s], b) @ (torch.einsum("k,krd->rd", gate[s], a) @ xm)
                )
                for xm, s in zip(x, ids)
            ]
        )
        got = gated_lora_reference(x, gate, a, b, ids, 1.0, output_mix)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
def test_single_lora_matches_peft(backend, device):
    """K = 1 with gate 1 is an ordinary LoRA: cross-check against PEFT on the same weights."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    d_in, d_out, rank, alpha = 24, 20, 4, 16
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    lora_model = peft.get_peft_model(
        model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0)
    )
    layer = lora_model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, d_in)
    expected = lora_model(x)
    ours = rk.gated_lora_linear(
        x.to(device),
        layer.base_layer.weight.detach().to(device),
        layer.base_layer.bias.detach().to(device),
        torch.ones(3, 1, device=device),
        layer.lora_A["default"].weight.detach()[None].to(device),
        layer.lora_B["default"].weight.detach()[None].to(device),
        scaling=alpha / rank,
        backend=backend,
    )
    torch.testing.assert_close(ours.cpu(), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
@pytest.mark.parametrize("mix", ["weight", "output"])
def test_opcheck(backend, device, mix):
    inputs = make_inputs((2, 3, 3, 4, 10, 9), linear=True)
    t = {n: v.to(device=device, dtype=torch.float32) for n, v in inputs.items() if v is not None}
    for weight, bias in ((None, None), (t["weight"], t["bias"])):
        args = (
            t["x"].reshape(-1, 10).requires_grad_(),
            weight,
            bias,
            t["gate"].requires_grad_(),
            t["lora_a"].requires_grad_(),
            t["lora_b"].requires_grad_(),
            None,
            2.0,
            mix == "output",
        )
        torch.library.opcheck(torch.ops.reclora.gated_lora.default, args + (backend,))
        if backend in ("cpu", "cuda"):
            native_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(torch.ops.reclora.gated_lora_forward.default, native_args)
            _, u = torch.ops.reclora.gated_lora_forward(*native_args)
            grad_out = torch.randn(6, 9, device=device)
            backward_args = (grad_out, native_args[0], u, native_args[1]) + native_args[3:]
            torch.library.opcheck(torch.ops.reclora.gated_lora_backward.default, backward_args)


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
@pytest.mark.parametrize("mix", ["weight", "output"])
def test_backward_reuses_the_forwards_u(backend, device, mix):
    """The backward kernels take the forward's u instead of recomputing it: a u of the wrong shape is
    refused with its name, and u's values are what the backward reads."""
    module = importlib.import_module("reclora_kernels.gated_lora")
    inputs = make_inputs((2, 3, 3, 4, 10, 9))
    x, gate, a, b = (inputs[n].to(device=device, dtype=torch.float32) for n in ("x", "gate", "lora_a", "lora_b"))
    args = (x.reshape(-1, 10), None, None, gate, a, b, None, 2.0, mix == "output")
    kernels = module._kernels(backend)
    _, u = kernels.gated_lora_forward(*args)
    grad_out = torch.randn(6, 9, device=device)
    backward_args = (None, gate, a, b, None, 2.0, mix == "output")
    if not cuda_emulation.under_sanitizer():
        with pytest.raises((RuntimeError, ValueError), match=r"u (must be the forward's|\(the forward's)"):
            kernels.gated_lora_backward(grad_out, args[0], u[:, :-1].contiguous(), *backward_args)
    _, _, grad_a, grad_b = kernels.gated_lora_backward(grad_out, args[0], u, *backward_args)
    _, _, grad_a_zero_u, grad_b_zero_u = kernels.gated_lora_backward(
        grad_out, args[0], torch.zeros_like(u), *backward_args
    )
    torch.testing.assert_close(grad_a_zero_u, grad_a)  # dA reads x and grad_out, not u
    assert grad_b.abs().sum() > 0 and torch.count_nonzero(grad_b_zero_u) == 0  # dB = G^T (gated u)


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
@pytest.mark.parametrize("mix", ["weight", "output"])
def test_eager_path_matches_custom_op(backend, device, mix, monkeypatch):
    """Plain eager calls skip the custom op's dispatch layers; the result and gradients are the same bits."""
    module = importlib.import_module("reclora_kernels.gated_lora")  # the package's gated_lora is the function

    inputs = make_inputs((2, 3, 3, 4, 10, 9), linear=True)
    eager = run(inputs, backend, device, torch.float32, mix)
    calls = []
    original = module._gated_lora_op
    monkeypatch.setattr(module, "_needs_custom_op", lambda _inputs: True)
    monkeypatch.setattr(module, "_gated_lora_op", lambda *a: calls.append(1) or original(*a))
    through_op = run(inputs, backend, device, torch.float32, mix)
    assert calls, "the custom op was not called"
    torch.testing.assert_close(eager[0], through_op[0], rtol=0, atol=0)
    for name in eager[1]:
        torch.testing.assert_close(eager[1][name], through_op[1][name], rtol=0, atol=0, msg=name)


def test_tracing_sees_the_custom_op():
    """torch.compile, functorch and dispatch modes need the registered op, not the eager shortcut."""
    from torch.utils._python_dispatch import TorchDispatchMode

    module = importlib.import_module("reclora_kernels.gated_lora")

    x = torch.zeros(2, 3)
    assert not module._needs_custom_op((x, None, 1.0, "cpu"))

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert module._needs_custom_op((x,))
    assert torch.func.vmap(lambda row: torch.tensor(module._needs_custom_op((row,))))(x).all()
    assert not module._needs_custom_op((torch.nn.Parameter(x),))  # model weights take the eager path


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora")[:2])
def test_torch_compile_fullgraph(backend, device):
    inputs = make_inputs((2, 3, 4, 2, 12, 10), linear=True)
    t = {n: v.to(device=device, dtype=torch.float32) for n, v in inputs.items()}

    def layer(x, weight, bias, gate, lora_a, lora_b):
        return rk.gated_lora_linear(x, weight, bias, gate, lora_a, lora_b, scaling=2.0, backend=backend)

    compiled = torch.compile(layer, fullgraph=True)
    args = [t[n] for n in ("x", "weight", "bias", "gate", "lora_a", "lora_b")]
    torch.testing.assert_close(compiled(*args), layer(*args))


BAD_INPUTS = [
    ("x", lambda i: i.update(x=i["x"][0, 0]), ValueError, "x must have 2 or 3 dimensions"),
    ("x", lambda i: i.update(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("x", lambda i: i.update(x=i["x"].long()), TypeError, "x must have dtype"),
    ("gate", lambda i: i.update(gate=i["gate"][:1]), ValueError, "B = gate.shape[0]"),
    ("lora_a", lambda i: i.update(lora_a=i["lora_a"][:, :, :-1]), ValueError, "lora_a must have shape"),
    ("lora_a", lambda i: i.update(lora_a=i["lora_a"][:1]), ValueError, "lora_a must have shape"),
    ("lora_b", lambda i: i.update(lora_b=i["lora_b"][:, :, :-1]), ValueError, "lora_b must have shape"),
    ("lora_b", lambda i: i.update(lora_b=i["lora_b"].half()), TypeError, "lora_b must have the same dtype as x"),
    ("mix", lambda i: i.update(mix="sum"), ValueError, "mix must be one of weight or output"),
    ("scaling", lambda i: i.update(scaling=torch.tensor(2.0)), TypeError, "scaling must be a Python float"),
    ("backend", lambda i: i.update(backend="fast"), ValueError, "backend must be None or one of"),
    ("backend", lambda i: i.update(backend="cuda"), rk.BackendUnavailableError, "backend 'cuda' is unavailable"),
    ("sample_index", lambda i: i.update(sample_index=torch.tensor([0, 1])), ValueError, "packed tokens (M, d_in)"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD_INPUTS, ids=[b[0] + str(n) for n, b in enumerate(BAD_INPUTS)])
def test_bad_input_is_named(name, mutate, error, message):
    inputs = {n: v.float() for n, v in make_inputs((2, 3, 2, 2, 8, 6)).items()}
    inputs.update(scaling=1.0, mix="weight", backend=None)
    mutate(inputs)
    if name == "backend" and inputs["backend"] == "cuda" and torch.cuda.is_available():
        pytest.skip("cuda is available here")
    with pytest.raises(
        error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        rk.gated_lora(**inputs)


def test_bad_packed_sample_index():
    inputs = {
        n: v.float() if v.is_floating_point() else v for n, v in make_inputs((3, 2, 2, 2, 8, 6), packed=True).items()
    }
    bad = inputs["sample_index"].clone()
    bad[0] = 3
    with pytest.raises(ValueError, match=r"sample_index must hold rows of gate in \[0, 3\)"):
        rk.gated_lora(**{**inputs, "sample_index": bad})
    with pytest.raises(ValueError, match="sample_index must have shape"):
        rk.gated_lora(**{**inputs, "sample_index": bad[:-1]})
    with pytest.raises(TypeError, match="sample_index must have dtype int64"):
        rk.gated_lora(**{**inputs, "sample_index": bad.int()})
    with pytest.raises(ValueError, match="weight must have shape"):
        rk.gated_lora_linear(**{**inputs, "weight": torch.zeros(6, 7), "bias": None})
    if rk.unavailable_reason("cpu", "cpu", "gated_lora") is None:
        with pytest.raises(TypeError, match="the cpu backend supports float32"):
            rk.gated_lora(**{n: v.double() if v.is_floating_point() else v for n, v in inputs.items()}, backend="cpu")


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora")[:2])
def test_torch_compile_fullgraph_packed(backend, device):
    inputs = make_inputs((3, 2, 4, 2, 12, 10), packed=True)
    t = {
        n: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
        for n, v in inputs.items()
    }

    def layer(x, gate, lora_a, lora_b, sample_index):
        return rk.gated_lora(x, gate, lora_a, lora_b, 2.0, mix="output", sample_index=sample_index, backend=backend)

    args = [t[n] for n in ("x", "gate", "lora_a", "lora_b", "sample_index")]
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(*args), layer(*args))


def layout_gradient(layout, shape, gen):
    """An upstream gradient of the output's shape in a given memory layout."""
    if layout == "sum":  # what y.sum().backward() passes: every stride 0
        return torch.ones(()).expand(shape)
    if layout == "broadcast_row":  # (y * w).sum() for a (d_out,) w: row stride 0
        return torch.randn(shape[-1], generator=gen).expand(shape)
    return torch.randn(tuple(reversed(shape)), generator=gen).permute(*reversed(range(len(shape))))


@pytest.mark.parametrize("backend,device", kernel_backends("gated_lora"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", ["weight", "output"])
@pytest.mark.parametrize("layout", ["sum", "broadcast_row", "transposed"])
@pytest.mark.parametrize("linear", [False, True])
def test_gradient_layouts(backend, device, dtype, mix, layout, linear):
    """Broadcast and non-contiguous upstream gradients give the gradients of their dense copy, and the
    float64 reference's within tolerance."""
    inputs = make_inputs((3, 5, 4, 3, 37, 19), linear=linear)
    grad = layout_gradient(layout, (3, 5, 19), torch.Generator().manual_seed(3))
    results = []
    for upstream, backend_, dtype_ in (
        (grad, backend, dtype),
        (grad.contiguous(), backend, dtype),
        (grad, "torch", torch.float64),
        (grad, "torch", dtype),
    ):
        leaves = {
            n: v.detach()
            .to(device=device, dtype=torch.float32 if n == "gate" and dtype_ != torch.float64 else dtype_)
            .requires_grad_()
            for n, v in inputs.items()
            if v is not None
        }
        fn = rk.gated_lora_linear if linear else rk.gated_lora
        out = fn(**leaves, scaling=2.0, mix=mix, backend=backend_)
        out.backward(upstream.to(device=device, dtype=out.dtype))
        results.append({n: leaf.grad.cpu() for n, leaf in leaves.items()})
    strided, dense, grads64, grads_same = results
    for name in grads64:
        torch.testing.assert_close(strided[name], dense[name], rtol=0, atol=0, msg=name)
        assert_within_tolerance(f"grad {name}", strided[name], grads64[name], grads_same[name], dtype)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("linear", [False, True])
def test_zero_input_features_are_named(backend, linear):
    """d_in = 0 is refused with the argument's name on every backend, not met with an internal reshape error."""
    x, gate = torch.zeros(2, 3, 0), torch.ones(2, 4) / 4
    lora_a, lora_b = torch.zeros(4, 2, 0), torch.zeros(4, 5, 2)
    op = (
        rk.gated_lora
        if not linear
        else lambda *a, **k: rk.gated_lora_linear(a[0], torch.zeros(5, 0), None, *a[1:], **k)
    )
    with pytest.raises(ValueError, match=r"x must have d_in >= 1 features, got shape \(2, 3, 0\)"):
        op(x, gate, lora_a, lora_b, backend=backend)
