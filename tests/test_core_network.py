"""NCSN++ and MLP: shapes, conditioning, higher-order AD; EMA."""
import pytest
import torch
import torch.nn.functional as F

import qcsbm


@pytest.mark.parametrize("size", [8, 16, 32])
def test_ncsnpp_shapes_and_time_dependence(size):
    torch.manual_seed(0)
    f = qcsbm.NCSNpp(qcsbm.NCSNppConfig.tiny(image_size=size))
    x = torch.rand(2, 3, size, size)
    out = f(x, torch.tensor([0.1, 0.1]))
    assert out.shape == x.shape
    assert (out - f(x, torch.tensor([5.0, 5.0]))).abs().max() > 1e-4


def test_ncsnpp_double_backward_and_forward_mode_jvp():
    torch.manual_seed(0)
    f = qcsbm.NCSNpp(qcsbm.NCSNppConfig.tiny(image_size=8, channels=1))
    x, std = torch.rand(2, 1, 8, 8, requires_grad=True), torch.tensor([0.5, 2.0])
    (g,) = torch.autograd.grad(f(x, std).pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()                                               # double backward
    assert all(p.grad is not None for p in f.parameters() if p.requires_grad)
    v = torch.randn_like(x)
    _, jvp = torch.func.jvp(lambda y: f(y, std), (x.detach(),), (v,))      # forward mode
    (vjp,) = torch.autograd.grad(f(x, std), x, v)
    # <v, J v> from both modes agree: v^T (J v) = (J^T v)^T v
    assert torch.allclose((jvp * v).sum(), (vjp * v).sum(), rtol=1e-4)


@pytest.mark.parametrize("mode", ["down", "up", "blur"])
def test_fir_is_the_1331_filter_with_exact_derivatives_of_every_order(mode):
    """FIR is the [1,3,3,1] (x) [1,3,3,1] filter (a depthwise (transposed) convolution), and its hand-
    written linear backward gives exact first, second and third derivatives and forward-mode JVPs."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, 6, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    k = (torch.outer(k, k) / (16.0 if mode == "up" else 64.0)).expand(5, 1, 4, 4)  # zero insertion: gain 4
    ref = {"down": lambda y: F.conv2d(y, k, stride=2, padding=1, groups=5),
           "up": lambda y: F.conv_transpose2d(y, k, stride=2, padding=1, groups=5),
           "blur": lambda y: F.conv2d(y, k, padding=2, groups=5)}[mode]
    fir = qcsbm.FIR(mode).double()
    assert fir(x).shape == ref(x).shape == (2, 5, *{"down": (4, 3), "up": (16, 12), "blur": (9, 7)}[mode])
    assert torch.allclose(fir(x), ref(x), atol=1e-14)
    assert torch.autograd.gradcheck(fir, (x,)) and torch.autograd.gradgradcheck(fir, (x,))
    v, w = torch.randn_like(x), torch.randn_like(fir(x), requires_grad=True)
    (g,) = torch.autograd.grad(fir(x), x, w, create_graph=True)          # J^T w, differentiable in w
    (jv,) = torch.autograd.grad(g, w, v, create_graph=True)              # J v by the double-VJP trick
    assert torch.allclose(jv, ref(v), atol=1e-14)
    assert torch.allclose(torch.func.jvp(fir, (x.detach(),), (v,))[1], ref(v), atol=1e-14)
    odd = torch.randn(1, 2, 7, 5, dtype=torch.float64, requires_grad=True)  # odd sizes round trip
    (g,) = torch.autograd.grad(qcsbm.FIR(mode).double()(odd).sum(), odd)
    assert g.shape == odd.shape


@pytest.mark.parametrize("stride, padding", [((1, 1), (1, 1)), ((2, 2), (0, 0))])
def test_fast_conv_matches_autograd_conv_to_third_order(stride, padding):
    """qcsbm._Conv (derivatives by convolution_backward) against F.conv2d differentiated by autograd, in
    float64: gradcheck, gradgradcheck, and through tanh (the convolution itself is bilinear) the gradient
    of ||J^T v||^2 (second order) and one more derivative of that (third order), in x, weights and bias."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w1, w2 = (torch.randn(c_out, c_in, 3, 3, dtype=torch.float64, requires_grad=True) for c_out, c_in in [(3, 2), (2, 3)])
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fast = lambda x, w, b: qcsbm._Conv.apply(x, w, b, stride, padding)
    assert torch.autograd.gradcheck(fast, (x[:1, :, :4, :4], w1, b))
    assert torch.autograd.gradgradcheck(fast, (x[:1, :, :4, :4], w1, b))
    inputs, results = [x, w1, w2, b], []
    for conv in (qcsbm._Conv.apply, F.conv2d):
        s = conv(torch.tanh(conv(x, w1, b, stride, padding)), w2, None, (1, 1), (1, 1))
        v = torch.ones_like(s).index_fill_(3, torch.tensor([0]), -1.0)
        (u,) = torch.autograd.grad(s, x, v, create_graph=True)                       # J^T v
        second = torch.autograd.grad((u * u).sum(), inputs, create_graph=True)
        third = torch.autograd.grad(sum((g * g.detach().sin()).sum() for g in second), inputs)
        results.append([*second, *third])
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(*results))
    assert all(a.abs().max() > 1e-3 for a in results[1])                           # nothing vanished


def test_fast_conv_network_is_the_same_network():
    """NCSNppConfig(fast_conv=True): same parameter names, same output, same QC-step gradient."""
    torch.manual_seed(0)
    cfg = qcsbm.NCSNppConfig.tiny(image_size=8, channels=1)
    f = qcsbm.NCSNpp(cfg).double()
    g = qcsbm.NCSNpp(qcsbm.NCSNppConfig(**{**cfg.__dict__, "fast_conv": True})).double()
    g.load_state_dict(f.state_dict(), strict=True)
    x0, grads = torch.rand(3, 1, 8, 8, dtype=torch.float64), []
    for net in (f, g):
        total = qcsbm.training_loss(net, x0, qcsbm.VESDE(), lam=1.0, generator=torch.Generator().manual_seed(0))[0]
        grads.append(torch.cat([p.flatten() for p in torch.autograd.grad(total.mean(), list(net.parameters()))]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12) and grads[0].norm() > 0
    f, g, x = f.float(), g.float(), x0[:, :, :8, :8].float()                 # bf16 autocast: same casts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = qcsbm.training_loss(g, x, qcsbm.VESDE(), lam=1.0)[0]
        assert torch.equal(f(x, torch.ones(3)), g(x, torch.ones(3)))
    total.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in g.parameters())


def third_order(fn, inputs):
    """The gradient of ||J^T v||^2 w.r.t. every input (second order) and one more derivative of it (third)."""
    out = fn(*inputs)
    v = torch.ones_like(out).flatten().index_fill_(0, torch.arange(0, out.numel(), 3), -1.0).reshape(out.shape)
    (u,) = torch.autograd.grad(out, inputs[0], v, create_graph=True)
    second = torch.autograd.grad((u * u).sum(), inputs, create_graph=True)
    third = torch.autograd.grad(sum((g * g.detach().sin()).sum() for g in second), inputs)
    return [*second, *third]


def test_fast_norm_ops_match_group_norm_and_softmax_to_third_order():
    """norm_composite and softmax_composite (NCSNppConfig.fast_norm) against F.group_norm and torch.softmax
    differentiated by autograd, in float64: values, gradcheck, gradgradcheck, and second- and third-order
    derivatives through a tanh (in x, scale and shift)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fast = lambda x, w, b: torch.tanh(qcsbm.norm_composite(x, 4, w, b, 1e-6))
    plain = lambda x, w, b: torch.tanh(F.group_norm(x, 4, w, b, 1e-6))
    assert torch.allclose(fast(x, w, b), plain(x, w, b), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(fast, (x[:1, :4, :2], w[:4], b[:4]))
    assert torch.autograd.gradgradcheck(fast, (x[:1, :4, :2], w[:4], b[:4]))
    for a, r in zip(third_order(fast, [x, w, b]), third_order(plain, [x, w, b])):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-11) and r.abs().max() > 1e-3
    s = 3 * torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    fast, plain = (lambda s: torch.tanh(qcsbm.softmax_composite(s))), (lambda s: torch.tanh(torch.softmax(s, -1)))
    assert torch.allclose(fast(s), plain(s), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(fast, (s[:1, :3, :4].detach().requires_grad_(),))
    assert torch.autograd.gradgradcheck(fast, (s[:1, :3, :4].detach().requires_grad_(),))
    for a, r in zip(third_order(fast, [s]), third_order(plain, [s])):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-11) and r.abs().max() > 1e-3


def test_fast_norm_network_is_the_same_network(monkeypatch):
    """NCSNppConfig(fast_norm=True), with and without fast_conv: same parameter names, same output, same
    QC-step gradient as the plain network in float64, every GroupNorm and softmax through the composites;
    under bf16 autocast it trains (finite gradients)."""
    calls = {"norm": 0, "softmax": 0}
    for name, key in (("norm_composite", "norm"), ("softmax_composite", "softmax")):
        def counted(*args, _f=getattr(qcsbm, name), _k=key):
            calls[_k] += 1
            return _f(*args)
        monkeypatch.setattr(qcsbm, name, counted)
    torch.manual_seed(0)
    cfg = qcsbm.NCSNppConfig.tiny(image_size=8, channels=1)
    f = qcsbm.NCSNpp(cfg).double()
    x0 = torch.rand(3, 1, 8, 8, dtype=torch.float64)

    def grad(net):
        total = qcsbm.training_loss(net, x0, qcsbm.VESDE(), lam=1.0, generator=torch.Generator().manual_seed(0))[0]
        return torch.cat([p.flatten() for p in torch.autograd.grad(total.mean(), list(net.parameters()))])
    ref = grad(f)
    for fast_conv in (False, True):
        g = qcsbm.NCSNpp(qcsbm.NCSNppConfig(**{**cfg.__dict__, "fast_norm": True, "fast_conv": fast_conv})).double()
        g.load_state_dict(f.state_dict(), strict=True)
        calls.update(norm=0, softmax=0)
        assert torch.allclose(g(x0, torch.ones(3)), f(x0, torch.ones(3)), rtol=1e-12, atol=1e-12)
        n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in g.modules())
        n_attention = sum(isinstance(m, qcsbm.Attention) for m in g.modules())
        assert calls == {"norm": n_norms, "softmax": n_attention} and n_norms > 0 and n_attention > 0
        assert torch.allclose(grad(g), ref, rtol=1e-9, atol=1e-11) and ref.norm() > 0
    g = g.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = qcsbm.training_loss(g, x0.float(), qcsbm.VESDE(), lam=1.0)[0]
    total.mean().backward()
    assert torch.isfinite(total).all() and all(torch.isfinite(p.grad).all() for p in g.parameters())


def test_attention_is_softmax_attention_over_pixels():
    """Attention (two bmm's in one layout) against the formula written with einsum, in float64: the
    output, and the parameter gradient of a two-VJP L_QC-style loss (second derivatives)."""
    torch.manual_seed(0)
    att = qcsbm.Attention(8, init_scale=1.0).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)

    def ref(y):
        B, C, H, W = y.shape
        q, k, v = (m(att.norm(y)).reshape(B, C, H * W) for m in (att.q, att.k, att.v))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / C ** 0.5, dim=-1)  # over j, per pixel i
        return (y + att.out(torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W))) / 2 ** 0.5

    assert torch.allclose(att(x), ref(x), atol=1e-13)
    v = torch.randn_like(x)
    grads = []
    for fn in (att, ref):
        s = fn(x)
        (u,) = torch.autograd.grad(s, x, v, create_graph=True)
        (r,) = torch.autograd.grad(s, x, u, create_graph=True)
        grads.append(torch.autograd.grad((u * u).sum() - (v * r).sum(), list(att.parameters()),
                                         allow_unused=True, materialize_grads=True))  # biases: zero
    assert all(torch.allclose(a, b, atol=1e-11) for a, b in zip(*grads))


def test_silu_matches_autograd_to_third_order_and_in_forward_mode():
    """qcsbm.silu (hand-written second-order rule) against F.silu differentiated by autograd."""
    torch.manual_seed(0)
    x = (4 * torch.randn(64, dtype=torch.float64)).requires_grad_()
    v = torch.randn_like(x)

    def derivatives(fn):  # the function and its first three derivatives at x, by repeated grad
        out, y = [], fn(x)
        for _ in range(4):
            out.append(y)
            (y,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        return out

    for ours, ref in zip(derivatives(qcsbm.silu), derivatives(F.silu)):
        assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.autograd.gradcheck(qcsbm.silu, (x,)) and torch.autograd.gradgradcheck(qcsbm.silu, (x,))
    ours, ref = (torch.func.jvp(fn, (x.detach(),), (v,))[1] for fn in (qcsbm.silu, F.silu))
    assert torch.allclose(ours, ref, atol=1e-12)
    (g,) = torch.autograd.grad(qcsbm.silu(x), x, v)                    # first order: the fused kernel
    assert not g.requires_grad and torch.allclose(g, torch.autograd.grad(F.silu(x), x, v)[0], atol=1e-12)
    grads = []                       # second order by a plain backward (the in-place path of a QC step)
    for fn in (qcsbm.silu, F.silu):
        y = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(fn(y), y, v, create_graph=True)
        g.backward(v)
        grads.append(y.grad)
    assert torch.allclose(*grads, atol=1e-12)


def test_ncsnpp_rejects_wrong_input_shape():
    f = qcsbm.NCSNpp(qcsbm.NCSNppConfig.tiny(image_size=8))
    with pytest.raises(ValueError, match="built for"):
        f(torch.rand(2, 3, 16, 16), torch.ones(2))


def test_c_score_under_no_grad_for_sampling():
    torch.manual_seed(0)
    sde, f = qcsbm.VESDE(), qcsbm.NCSNpp(qcsbm.NCSNppConfig.tiny(image_size=8, channels=1))
    x = sde.prior_sample((2, 1, 8, 8))
    out, nfe = qcsbm.pc_sampler(lambda y, t: qcsbm.score(f, y, t, sde, "c"), x, sde, 3)
    assert out.shape == x.shape and torch.isfinite(out).all() and nfe == 6


def test_ema_tracks_parameters_with_score_sde_warmup():
    """p_ema <- d p_ema + (1 - d) p with d = min(decay, (1 + n) / (10 + n)) at the n-th update."""
    model = qcsbm.MLP()
    ema = qcsbm.EMA(model, decay=0.5)
    for n in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        before = [p.clone() for p in ema.model.parameters()]
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))                      # 2/11, 3/12, ..., 10/19, then 0.5
        for b, p_ema, p in zip(before, ema.model.parameters(), model.parameters()):
            assert torch.allclose(p_ema, d * b + (1 - d) * p)
    assert ema.num_updates == 12
    ema2 = qcsbm.EMA(qcsbm.MLP(), 0.5)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.num_updates == 12
    assert all(torch.equal(a, b) for a, b in zip(ema2.model.parameters(), ema.model.parameters()))
