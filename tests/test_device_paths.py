"""Paths chosen for the device: the SVI steps run the decoder frozen, with its LSTMs in train mode in evaluation
(so that a GPU can use cuDNN's backward), with results equal to eval mode's, and evaluation chunks are sized for the device with
results that do not depend on the chunk size."""
import torch

import common


def decoder_and_batch(dropout=0.5):
    torch.manual_seed(0)
    decoder = common.LSTMDecoder(vocab_size=30, emb_dim=8, hidden_dim=16, latent_dim=3, dropout=dropout)
    for p in decoder.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    x = torch.cat([torch.zeros(6, 1, dtype=torch.long), torch.randint(3, 30, (6, 7))], 1)
    return decoder, x


def objective_gradient(decoder, x, mode):
    """The gradient of the SVI objective with respect to lambda = (mean, logvar), as the steps compute it."""
    mean, logvar = (torch.randn(6, 3, generator=torch.Generator().manual_seed(1)) for _ in range(2))
    lam = [mean.requires_grad_(), logvar.requires_grad_()]
    with torch.enable_grad(), mode:
        generator = torch.Generator().manual_seed(2)
        f = common.svi_objective(decoder, x, *lam, 1.0, generator).sum()
        return f.detach(), torch.autograd.grad(f, lam)


def test_svi_mode_equals_eval_mode_and_is_restored():
    decoder, x = decoder_and_batch()
    decoder.eval()
    f_eval, g_eval = objective_gradient(decoder, x, torch.backends.cudnn.flags(enabled=False))   # the former path
    f_mode, g_mode = objective_gradient(decoder, x, common.svi_mode(decoder))
    assert torch.equal(f_eval, f_mode) and all(torch.equal(a, b) for a, b in zip(g_eval, g_mode))
    assert not decoder.training and not decoder.lstm.training                # restored
    assert all(p.requires_grad for p in decoder.parameters())
    decoder.train()                                                          # the decoder's dropout would differ:
    f_train, _ = objective_gradient(decoder, x, common.svi_mode(decoder))
    assert not torch.equal(f_train, f_eval)                                  # the test can tell the modes apart
    assert decoder.lstm.training                                             # a training LSTM is left as it was


def test_svi_mode_is_restored_after_an_error():
    decoder, _ = decoder_and_batch()
    decoder.eval()
    decoder.embed.weight.requires_grad_(False)                # frozen before (--oracle's generator): stays so
    try:
        with common.svi_mode(decoder):
            assert decoder.lstm.training and not decoder.training
            assert not any(p.requires_grad for p in decoder.parameters())
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert not decoder.lstm.training
    assert not decoder.embed.weight.requires_grad
    assert all(p.requires_grad for name, p in decoder.named_parameters() if name != "embed.weight")


def test_evaluation_chunks_do_not_change_the_result():
    decoder, x = decoder_and_batch(dropout=0.0)
    decoder.eval()
    encoder = common.LSTMEncoder(30, 8, 16, 3)
    assert common.chunk_floats(torch.device("cpu")) == 2 ** 25
    results = []
    for max_floats in (None, 2 ** 25):                       # the device's default is that size on a CPU
        torch.manual_seed(3)
        results.append(common.evaluate(encoder, decoder, [x, x[:4]], 20, max_floats=max_floats))
    assert results[0] == results[1]

    def narrow(x):    # q nearly a point, so that every sample is the mean whatever the chunks draw
        return torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(4)), torch.full((x.shape[0], 3), -40.0)
    one_call, one_sample_per_call = (common.evaluate(narrow, decoder, [x, x[:4]], 20, max_floats=m) for m in (None, 300))
    for key in ("rec", "kl", "neg_elbo"):
        assert abs(one_call[key] - one_sample_per_call[key]) < 1e-5 * abs(one_call[key]), key


def projection_and_targets(rows, hidden, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=g, dtype=dtype) * hidden ** -0.5).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_()
    target = torch.randint(vocab, (rows,), generator=g)
    weights = torch.rand(rows, generator=g, dtype=dtype)       # an uneven incoming gradient
    return h, weight, bias, target, weights


def test_linear_nll_equals_autograd_cross_entropy():
    """The fused projection + cross-entropy against autograd's, in float64 (to rounding) and in float32 at a
    training batch's size (20 sentences x 40 tokens, 5,000 words)."""
    for dtype, rows, vocab, tol in ((torch.float64, 50, 300, 1e-12), (torch.float32, 800, 5000, 1e-5)):
        h, weight, bias, target, weights = projection_and_targets(rows, 64, vocab, dtype)
        inputs = (h, weight, bias)
        reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, weight, bias), target,
                                                      reduction="none")
        fused = common.LinearNLL.apply(h, weight, bias, target)
        assert (fused - reference).abs().max() <= tol * reference.abs().max()
        for a, b in zip(torch.autograd.grad((reference * weights).sum(), inputs),
                        torch.autograd.grad((fused * weights).sum(), inputs)):
            assert (a - b).abs().max() <= tol * a.abs().max()


def test_linear_nll_double_backward():
    """savae.py --hvp exact differentiates the gradient again: gradgradcheck in float64, with and without bias."""
    h, weight, bias, target, _ = projection_and_targets(5, 4, 7, torch.float64)
    assert torch.autograd.gradgradcheck(lambda a, b, c: common.LinearNLL.apply(a, b, c, target), (h, weight, bias))
    assert torch.autograd.gradgradcheck(lambda a, b: common.LinearNLL.apply(a, b, None, target), (h, weight))


def test_decoder_log_prob_equals_its_logits():
    """log_prob against a cross-entropy of the decoder's own logits, dropout masks replayed, at a size that
    takes LinearNLL (2 x 6 x 7 rows x 4,000 words)."""
    torch.manual_seed(0)
    decoder = common.LSTMDecoder(vocab_size=4000, emb_dim=8, hidden_dim=16, latent_dim=3, dropout=0.5).double()
    x = torch.cat([torch.zeros(6, 1, dtype=torch.long), torch.randint(3, 4000, (6, 7))], 1)
    z = torch.randn(6, 2, 3, dtype=torch.float64)
    fused = decoder.log_prob(x, z, torch.Generator().manual_seed(4))
    logits, _ = decoder.logits(x[:, :-1].repeat_interleave(2, 0), z.reshape(12, 3), generator=torch.Generator().manual_seed(4))
    targets = x[:, 1:].repeat_interleave(2, 0)
    reference = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(-1)
    assert 12 * 7 * 4000 >= 2 ** 18 and decoder.training
    assert torch.allclose(fused, reference.view(6, 2), rtol=1e-12, atol=1e-12)


def test_keep_freed_memory():
    """glibc's mallopt takes both settings; without glibc nothing changes, and it says so."""
    import platform
    assert common.keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
