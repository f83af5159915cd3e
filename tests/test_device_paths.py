"""Paths chosen for the device: the SVI steps of evaluation run the decoder's LSTMs in train mode (so that a GPU
can use cuDNN's backward) with results equal to eval mode's, and evaluation chunks are sized for the device with
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


def test_lstm_backward_mode_equals_eval_mode_and_is_restored():
    decoder, x = decoder_and_batch()
    decoder.eval()
    f_eval, g_eval = objective_gradient(decoder, x, torch.backends.cudnn.flags(enabled=False))   # the former path
    f_mode, g_mode = objective_gradient(decoder, x, common.lstm_backward_mode(decoder))
    assert torch.equal(f_eval, f_mode) and all(torch.equal(a, b) for a, b in zip(g_eval, g_mode))
    assert not decoder.training and not decoder.lstm.training                # restored
    decoder.train()                                                          # the decoder's dropout would differ:
    f_train, _ = objective_gradient(decoder, x, common.lstm_backward_mode(decoder))
    assert not torch.equal(f_train, f_eval)                                  # the test can tell the modes apart
    assert decoder.lstm.training                                             # a training LSTM is left as it was


def test_lstm_backward_mode_is_restored_after_an_error():
    decoder, _ = decoder_and_batch()
    decoder.eval()
    try:
        with common.lstm_backward_mode(decoder):
            assert decoder.lstm.training and not decoder.training
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert not decoder.lstm.training


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
