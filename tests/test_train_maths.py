"""Training maths: pooling (direct == running summaries, invariant to chunking), soft labels,
seed A's loss, quantile calibration, standardisation folding, head/model dimension checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from lenpred.sidecar.heads import (HeadMeta, LengthHead, bin_index, egtp_loss, log_bins, quantile,  # noqa: E402
                                   random_head, save_head, soft_labels)
from lenpred.tap.config import TapConfig  # noqa: E402
from lenpred.tap.core import Tap  # noqa: E402
from lenpred.tap.pooling import pool_direct, summarize, summarize_segments, token_entropy  # noqa: E402
from lenpred.train import models  # noqa: E402
from lenpred.train.metrics import calibrate_scale, scores  # noqa: E402


def _direct(h, H, tau=1.0):
    """Textbook EGTP pool: w_i = exp(H_i/tau) / sum_j exp(H_j/tau); pool = sum_i w_i h_i."""
    w = np.exp(H.astype(np.float64) / tau)
    w /= w.sum()
    return (w[:, None] * h.astype(np.float64)).sum(0)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_pool_equals_direct_computation(tau):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g) * 5
    H = torch.rand(37, generator=g) * 8  # entropies up to 8 nats: exp() would overflow float16
    ref = _direct(h.numpy(), H.numpy(), tau)
    st = summarize(h, H, tau)
    np.testing.assert_allclose(st.pooled().numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pool_direct(h, H, tau).numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.mean().numpy(), h.numpy().mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.last.numpy(), h[-1].numpy())


def test_token_entropy_matches_definition():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g) * 3
    p = torch.softmax(logits.double(), -1)
    ref = -(p * p.log()).sum(-1)
    np.testing.assert_allclose(token_entropy(logits, chunk=2).numpy(), ref.numpy(), rtol=1e-5)


@pytest.mark.parametrize("cuts", [[37], [1, 36], [10, 10, 17], [5] * 7 + [2], [1] * 37])
def test_pool_invariant_to_chunking(cuts):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(37, 8, generator=g)
    H = torch.rand(37, generator=g) * 10
    ref = _direct(h.numpy(), H.numpy())
    st, off = None, 0
    for c in cuts:
        piece = summarize(h[off:off + c], H[off:off + c])
        st = piece if st is None else st.merge(piece)
        off += c
    np.testing.assert_allclose(st.pooled().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert st.n == 37


def test_tap_chunked_prefill_equals_one_pass():
    """The collector drives Tap.on_extend: a prompt prefilled in chunks across engine steps (and
    batched with another request) yields the same pooled vector as a single pass."""
    g = torch.Generator().manual_seed(3)
    hA, HA = torch.randn(20, 8, generator=g), torch.rand(20, generator=g) * 6
    hB, HB = torch.randn(7, 8, generator=g), torch.rand(7, generator=g) * 6
    tap = Tap(TapConfig(prefix_store_tokens=0), model_id="m", hidden_size=8)
    # step 1: A's first 12 tokens + all of B; step 2: A's remaining 8 tokens
    done1 = tap.on_extend(["A", "B"], torch.cat([hA[:12], hB]), torch.cat([HA[:12], HB]), [12, 7], [20, 7], [0, 0])
    done2 = tap.on_extend(["A"], hA[12:], HA[12:], [8], [20], [12])
    assert len(done1) == 1 and len(done2) == 1  # B completes in step 1, A in step 2
    np.testing.assert_allclose(done2[0].pooled().numpy(), _direct(hA.numpy(), HA.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(done1[0].pooled().numpy(), _direct(hB.numpy(), HB.numpy()), rtol=1e-5, atol=1e-6)
    segs = summarize_segments(torch.cat([hA, hB]), torch.cat([HA, HB]), [20, 7])
    np.testing.assert_allclose(segs[0].pooled().numpy(), done2[0].pooled().numpy(), rtol=1e-6, atol=1e-6)


def test_soft_labels():
    idx = torch.tensor([0, 5, 19])
    p = soft_labels(idx, 20)
    assert p.shape == (3, 20)
    np.testing.assert_allclose(p.sum(-1).numpy(), 1.0, rtol=1e-6)
    assert (p.argmax(-1) == idx).all()
    # p_j ∝ exp(-|j - i|): neighbours are e^-1 of the peak, two away e^-2
    assert math.isclose(float(p[1, 6] / p[1, 5]), math.exp(-1), rel_tol=1e-5)
    assert math.isclose(float(p[1, 3] / p[1, 5]), math.exp(-2), rel_tol=1e-5)
    assert torch.allclose(p[1, :5].flip(0), p[1, 6:11])  # symmetric


def test_bin_index_and_edges():
    e = torch.tensor(log_bins(512))
    assert len(e) == 21 and e[0] == 0 and e[-2] == 512
    assert bin_index(torch.tensor([0, 511, 512, 10_000]), e).tolist() == [0, 18, 19, 19]


def test_egtp_loss_is_095_ce_plus_005_mse():
    e = torch.tensor(log_bins(512))
    c = (e[:-1] + e[1:]) / 2
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 20, generator=g)
    y = torch.tensor([3.0, 50, 120, 300, 512, 40])
    t = soft_labels(bin_index(y, e), 20)
    ce = -(t * torch.log_softmax(logits, -1)).sum(-1).mean()
    mse = ((torch.log1p(torch.softmax(logits, -1) @ c) - torch.log1p(y)) ** 2).mean()
    assert torch.allclose(egtp_loss(logits, y, e, c), 0.95 * ce + 0.05 * mse, rtol=1e-5)
    # the soft-label target itself scores better than a wrong peak
    good = torch.log(t + 1e-9)
    bad = torch.log(soft_labels(torch.full((6,), 10), 20))
    assert egtp_loss(good, y, e, c) < egtp_loss(bad, y, e, c)


def test_quantile_calibration_reaches_target_coverage():
    rng = np.random.default_rng(0)
    y = rng.lognormal(5, 0.6, 20_000)
    raw = np.exp(5) * np.ones_like(y)          # a badly calibrated "p90" (the median)
    s = calibrate_scale(y[:10_000], raw[:10_000], 0.9)
    cov = (y[10_000:] <= s * raw[10_000:]).mean()
    assert 0.88 < cov < 0.92
    assert scores(y, raw, s * raw)["p90_coverage"] == pytest.approx(cov, abs=0.02)


def test_quantile_of_binned_distribution():
    e = torch.tensor([0.0, 10, 20, 30])
    p = torch.tensor([[0.5, 0.5, 0.0]])
    assert float(quantile(p, e, 0.5)) == pytest.approx(10.0)
    assert float(quantile(p, e, 0.75)) == pytest.approx(15.0)


def test_fold_standardisation_is_exact():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(50, 12, generator=g) * 7 + 3
    mu, sd = X.mean(0), X.std(0)
    lin = torch.nn.Linear(12, 4)
    ref = lin((X - mu) / sd)
    models.fold_standardisation(lin, mu, sd)
    assert torch.allclose(lin(X), ref, atol=1e-4)


def test_fit_head_learns_and_calibrates(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 16)).astype(np.float32)
    y = np.clip(np.exp(4 + 0.8 * X[:, 0] + 0.1 * rng.normal(size=600)), 1, 512).astype(np.float32)
    h = models.fit_head("egtp", X[:400], y[:400], X[400:500], y[400:500], model_id="m", hidden_size=16,
                        max_len=512, epochs=120, patience=120, log=lambda *_: None)
    models.calibrate_head(h, X[400:500], y[400:500])
    out = models.head_predict(h, X[500:])
    mae = np.abs(np.minimum(out["point"], 512) - y[500:]).mean()
    assert mae < 0.95 * np.abs(np.median(y[:400]) - y[500:]).mean()
    save_head(h, tmp_path / "egtp.safetensors")
    from lenpred.sidecar.heads import load_head

    h2 = load_head(tmp_path / "egtp.safetensors")
    np.testing.assert_allclose(models.head_predict(h2, X[500:])["p90"], out["p90"], rtol=1e-5)
    assert h2.meta.calibration["p90_scale"] == h.meta.calibration["p90_scale"]


def test_mismatched_head_and_model_dims_fail_clearly(tmp_path):
    from lenpred.train.predictors import load_dir

    save_head(random_head("egtp", 64, model_id="m"), tmp_path / "egtp.safetensors")
    with pytest.raises(ValueError, match="hidden size 64.*hidden size 576"):
        load_dir(tmp_path, hidden_size=576, model_id="m")
    with pytest.raises(ValueError, match="model"):
        load_dir(tmp_path, hidden_size=64, model_id="other/model")
    with pytest.raises(ValueError, match="input_dim"):
        LengthHead(HeadMeta(kind="plp", model_id="m", hidden_size=64, layer=-1, input_dim=64, bin_edges=log_bins(512)))
