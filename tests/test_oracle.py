"""Kim et al.'s synthetic data from an oracle generator, --oracle, the grid log p(x) and the gaps (--gaps)."""
import json
import math
import types

import torch

import common
import data
from conftest import METRIC_KEYS, run_scripts, succeeded
from test_math import LinearGaussian, linear_gaussian_data, mean_field_infer
from test_vae import one_line_error

ORACLE_ARGS = types.SimpleNamespace(dataset="synthetic_oracle", train_size=0, seed=0, device="cpu")


def test_grid_log_px_is_exact_on_linear_gaussian_models():
    for d in (1, 2):
        model = LinearGaussian(d=d, seed=d)
        x = linear_gaussian_data(model, n=40)
        log_px, coarse = common.grid_log_px(model, x, d)
        torch.testing.assert_close(log_px, model.exact_log_px(x), atol=1e-3, rtol=0)
        assert (log_px - coarse).abs().max() < 0.05     # the posterior (sd ~0.3) is wide enough for both spacings


def test_grid_log_px_matches_a_5000_sample_importance_estimate_on_the_oracle_lstm():
    dataset = data.load(ORACLE_ARGS)
    decoder, x = dataset.true_decoder, dataset.by_length["test"][6][:8]
    torch.manual_seed(0)
    grid, _ = common.grid_log_px(decoder, x, 2)
    # importance sampling from a proposal that knows nothing of the grid: N(0, 1.5^2 I), 5000 samples
    proposal_mean, proposal_logvar = torch.zeros(len(x), 2), torch.full((len(x), 2), math.log(1.5 ** 2))
    z = common.reparameterize(proposal_mean, proposal_logvar, 5000)
    with torch.no_grad():
        log_w = (common.log_prob_chunked(decoder, x, z) + common.log_prior(z)
                 - common.log_normal(z, proposal_mean.unsqueeze(1), proposal_logvar.unsqueeze(1)))
    iw = torch.logsumexp(log_w, 1) - math.log(5000)
    w = (log_w - log_w.max(1, keepdim=True).values).exp()
    se = w.std(1) / (w.mean(1) * math.sqrt(5000))                 # delta method: sd of log of the mean weight
    assert ((grid - iw).abs() < 4 * se + 0.01).all(), (grid, iw, se)
    assert se.max() < 0.2                                          # the comparison has power
    assert grid.mean() < -10                                       # five words out of 1000: a real likelihood


def test_amortization_gap_is_zero_at_the_optimum_and_both_gaps_match_closed_forms():
    torch.manual_seed(1)
    model = LinearGaussian()
    model.W[:, 1] = model.W[:, 0] + 0.5 * model.W[:, 1]          # correlated posterior: mean-field cannot fit it
    x = linear_gaussian_data(model, n=60)
    precision = torch.linalg.inv(model.posterior(x)[1])
    # the mean-field optimum has KL(q || p(z|x)) = (sum log diag(precision) - log det(precision)) / 2
    approximation = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)).item()
    best = common.gaps(mean_field_infer(model), model, x.split(30), 60, 2, samples=500, seed=0)
    assert abs(best["amortization_gap"]) < 0.01, best
    assert abs(best["approximation_gap"] - approximation) < 0.02, (best, approximation)
    assert approximation > 0.05                                    # W^T W is not diagonal: a real gap

    # a mean off by delta loses exactly delta^T precision delta / 2 of ELBO
    shift = 0.4
    delta = torch.full((2,), shift)
    expected = 0.5 * (delta @ precision @ delta).item()
    worse = common.gaps(mean_field_infer(model, shift=shift), model, x.split(30), 60, 2, samples=500, seed=0)
    assert abs(worse["amortization_gap"] - expected) < 0.05 * expected, (worse, expected)
    assert abs(worse["approximation_gap"] - approximation) < 0.02
    assert abs(worse["elbo_opt"] - best["elbo_opt"]) < 0.01 and worse["log_px"] == best["log_px"]


def test_gaps_of_a_poor_q_on_the_oracle_lstm_are_non_negative():
    dataset = data.load(ORACLE_ARGS)
    decoder, x = dataset.true_decoder, dataset.by_length["test"][6][:8]
    torch.manual_seed(2)

    def prior(x):                                                   # q = p(z): far from every posterior
        return torch.zeros(len(x), 2), torch.zeros(len(x), 2)
    result = common.gaps(prior, decoder, [x], 8, 2, samples=200, seed=0)
    assert result["amortization_gap"] > 5 * result["amortization_gap_se"] and result["amortization_gap"] > 1
    assert result["approximation_gap"] > -3 * result["approximation_gap_se"] - 0.01, result
    assert result["log_px_by"] == "grid" and result["examples"] == 8
    assert abs(result["opt"]["still_falling"]) < 0.05, result       # the budget was enough to converge


def test_synthetic_oracle_data_is_drawn_from_its_true_decoder():
    dataset = data.load(ORACLE_ARGS)
    decoder = dataset.true_decoder
    assert isinstance(decoder, common.LSTMDecoder) and dataset.vocab_size == 1003
    assert {s: dataset.size(s) for s in ("train", "valid", "test")} == {"train": 5000, "valid": 500, "test": 500}
    x, z = dataset.by_length["train"][6], dataset.true_z["train"]
    assert list(dataset.by_length["train"]) == [6] and (x[:, 0] == data.BOS).all()
    assert x[:, 1:].min() >= len(data.SPECIALS) and x.max() < 1003   # five words, never <s>, </s> or <unk>
    assert not any(p.requires_grad for p in decoder.parameters())
    assert decoder.init_state.weight.abs().max() == 0 and decoder.lstm.weight_ih_l0[:, 100:].abs().max() == 0
    again = data.load(ORACLE_ARGS)
    assert torch.equal(again.by_length["train"][6], x)                # the same data on every machine

    with torch.no_grad():
        true = decoder.log_prob(x, z.unsqueeze(1))[:, 0]
        # the first word's log-likelihood under the decoder's own logits matches its expectation (minus the
        # entropy) over the sampled data: sampling and log_prob describe the same distribution
        logits, _ = decoder.logits(x[:, :1], z)
        log_p = logits[:, 0].log_softmax(-1)
        observed = log_p.gather(1, x[:, 1:2])[:, 0]
        expected = (log_p.exp() * log_p).sum(-1)
        diff = observed - expected
        assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)), (observed.mean(), expected.mean())

        perturbed = data.oracle_generator()[0]
        perturbed.out.weight.add_(0.3 * torch.randn(perturbed.out.weight.shape, generator=torch.Generator().manual_seed(0)))
        assert (true - perturbed.log_prob(x, z.unsqueeze(1))[:, 0]).mean() > 0.5     # a KL: > 0 for the true one
        shuffled = decoder.log_prob(x, z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))].unsqueeze(1))
        assert (true - shuffled[:, 0]).mean() > 5                      # z matters: a few nats of information
        assert -true.mean() / 5 < math.log(1000) - 1                   # and the words are far from uniform


def test_oracle_flag_freezes_the_decoder_and_gaps_go_into_metrics(tmp_path):
    tiny = ["--dataset", "synthetic_oracle", "--oracle", "--train_size", "100", "--iw_samples", "4",
            "--val_iw_samples", "2"]
    procs = run_scripts({                                             # two at a time, the training run first
        "vae": [("vae.py", *tiny, "--epochs", "1", "--gaps", "8", "--save_dir", tmp_path / "v")],
        "hidden_dim": [("vae.py", *tiny, "--hidden_dim", "20", "--save_dir", tmp_path / "h")],
        "svi": [("svi.py", *tiny, "--epochs", "0", "--svi_steps", "3", "--save_dir", tmp_path / "s")],
        "svi_trains": [("svi.py", *tiny, "--save_dir", tmp_path / "s2")],
        "no_dataset": [("vae.py", "--oracle", "--save_dir", tmp_path / "x")]})
    # the sizes come from the true generator: a contradicting size is refused before any work
    one_line_error(procs["hidden_dim"], "true generator", "hidden_dim is 100", "drop --hidden_dim")
    succeeded({name: procs[name] for name in ("vae", "svi")})
    assert "hidden_dim=100" in procs["vae"].stdout and "latent_dim=2" in procs["vae"].stdout
    saved = common.load_checkpoint(tmp_path / "v" / "model.pt", "cpu")
    true = data.oracle_generator()[0].state_dict()
    for modules in (saved["modules"], saved["best_modules"]):
        assert modules["decoder"].keys() == true.keys()
        assert all(torch.equal(modules["decoder"][k], true[k]) for k in true)
        fresh_encoder = common.LSTMEncoder(1003, 100, 100, 2).state_dict()
        assert not all(torch.equal(modules["encoder"][k], fresh_encoder[k]) for k in fresh_encoder)
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS | {"gaps"}
    gaps = metrics["gaps"]
    assert gaps["examples"] == 8 and gaps["log_px_by"] == "grid"
    assert gaps["amortization_gap"] > -3 * gaps["amortization_gap_se"] - 0.01
    assert abs(gaps["elbo_method"] + gaps["amortization_gap"] + gaps["approximation_gap"] - gaps["log_px"]) < 1e-3

    # svi.py has nothing to learn with the true generator: it scores with --epochs 0 and refuses to train
    assert set(json.loads((tmp_path / "s" / "metrics.json").read_text())) == METRIC_KEYS
    one_line_error(procs["svi_trains"], "--epochs 0")
    one_line_error(procs["no_dataset"], "synthetic_oracle")
