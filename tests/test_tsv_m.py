"""lora_tsv_m against per-task dense SVDs and polar factors."""

import torch
from conftest import (
    adapter_delta,
    rel_err,
)
from family import (
    INPUTS,
    WEIGHTS,
    family_config,
    run,
    stacked,
)


def test_lora_tsv_m(three):
    out = run(family_config("lora_tsv_m", rank=64, alpha=0.9, match_norm="none"))
    for name, delta in adapter_delta(out / "adapter").items():
        present = [
            (d, w)
            for d, w, n in zip(stacked(three, name), WEIGHTS, INPUTS, strict=True)
            if name in three[n]
        ]
        per = min(present[0][0].shape) // len(present)
        us, ss, vs = [], [], []
        for d, w in present:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            k = min(per, int((s > s[0] * 1e-6).sum()))
            us.append(u[:, :k])
            ss.append(s[:k] * w)
            vs.append(vh[:k].T)

        def polar(x):
            p, _, qh = torch.linalg.svd(x, full_matrices=False)
            return p @ qh

        expected = (
            0.9
            * polar(torch.cat(us, 1))
            @ torch.diag(torch.cat(ss))
            @ polar(torch.cat(vs, 1)).T
        )
        assert rel_err(delta, expected) < 1e-5, name


def test_lora_tsv_m_match_norm_mean(three):
    """match_norm: mean: the paper's update rescaled, per module, to the mean
    norm of the weighted updates, times alpha."""
    paper = adapter_delta(
        run(family_config("lora_tsv_m", rank=64, match_norm="none"), "paper")
        / "adapter"
    )
    default = adapter_delta(
        run(family_config("lora_tsv_m", rank=64, alpha=0.9, match_norm="mean"), "mean")
        / "adapter"
    )
    for name, delta in default.items():
        present = [
            (d, w)
            for d, w, n in zip(stacked(three, name), WEIGHTS, INPUTS, strict=True)
            if name in three[n]
        ]
        target = 0.9 * sum(abs(w) * d.norm() for d, w in present) / len(present)
        expected = paper[name] * (target / paper[name].norm())
        assert rel_err(delta, expected) < 1e-5, name
