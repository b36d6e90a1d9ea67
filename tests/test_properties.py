"""Property-based tests: every op either returns finite results equal to an fp64 formula or raises a
clear error naming the argument; the config loader either accepts a value or names the key."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import coft_fast.ops as ops  # noqa: E402
from coft_fast.config import Config, ConfigError  # noqa: E402

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
FAULTS = ["none", "label_high", "label_negative", "complement_high", "neg_columns", "integer_features",
          "mixed_dtype", "empty", "labels_int32", "scale_matrix"]
# which argument a fault's error message must name
NAMED = {"label_high": "labels", "label_negative": "labels", "complement_high": "complement_labels",
         "neg_columns": "neg_text", "integer_features": "image_feats", "mixed_dtype": "dtype", "empty": "N = 0",
         "labels_int32": "labels", "scale_matrix": "logit_scale"}
PROPERTY_SETTINGS = settings(max_examples=int(os.environ.get("COFT_HYPOTHESIS_EXAMPLES", "60")), deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


def backends():
    from coft_fast.kernels import triton_installed, triton_runnable

    names = ["reference"]
    if triton_installed() and triton_runnable(torch.device("cpu")):
        names.append("triton")
    return names


def dual_inputs(n, c, d, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    pos = F.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    neg = F.normalize(pos + torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    complement = (labels + torch.randint(1, max(c, 2), (n,), generator=g)) % c
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return [x.to(dtype), pos.to(dtype), neg.to(dtype), labels, complement, scale]


def dual_formula(x, pos, neg, labels, complement, scale, lam):
    """The op's definition in fp64 (on the inputs as rounded to their dtype)."""
    x, pos, neg = x.double(), pos.double(), neg.double()
    s_pos, s_neg = scale * x @ pos.T, scale * x @ neg.T
    l1 = F.cross_entropy(s_pos, labels)
    margin = s_pos - s_neg
    rows = torch.arange(len(x))
    l2 = (-F.logsigmoid(margin[rows, labels]) - F.logsigmoid(-margin[rows, complement])).mean()
    return l1 + lam * l2, l1, l2


def corrupt(args, fault):
    x, pos, neg, labels, complement, scale = args
    c = pos.shape[0]
    if fault == "label_high":
        labels = labels.clone()
        labels[0] = c
    elif fault == "label_negative":
        labels = labels.clone()
        labels[-1] = -1
    elif fault == "complement_high":
        complement = complement.clone()
        complement[0] = c + 3
    elif fault == "neg_columns":
        neg = torch.cat([neg, neg[:, :1]], dim=1)
    elif fault == "integer_features":
        x = (x * 100).to(torch.int32)
    elif fault == "mixed_dtype":
        pos = pos.to(torch.float32 if x.dtype != torch.float32 else torch.float16)
    elif fault == "empty":
        x, labels, complement = x[:0], labels[:0], complement[:0]
    elif fault == "labels_int32":
        labels = labels.to(torch.int32)
    elif fault == "scale_matrix":
        scale = torch.full((2, 2), float(scale))
    return [x, pos, neg, labels, complement, scale]


@PROPERTY_SETTINGS
@given(n=st.integers(1, 40), c=st.integers(1, 24), d=st.integers(1, 48), dtype=st.sampled_from(FLOATS),
       scale=st.floats(1.0, 100.0), lam=st.floats(0.0, 2.0), fault=st.sampled_from(FAULTS),
       backend=st.sampled_from(backends()), seed=st.integers(0, 2**16))
def test_dual_prompt_ops_agree_with_the_formula_or_name_the_bad_argument(n, c, d, dtype, scale, lam, fault,
                                                                          backend, seed):
    args = corrupt(dual_inputs(n, c, d, dtype, scale, seed), fault)
    if fault in ("label_high", "label_negative", "complement_high") and n == 0:
        return
    if fault == "none" and c == 1:
        args[4] = args[3].clone()  # the only class is its own complement
    if fault != "none":
        with pytest.raises((ValueError, TypeError)) as info:
            ops.dual_prompt_loss(*args, lam=lam, backend=backend)
        assert NAMED[fault] in str(info.value)
        return
    loss, l1, l2 = ops.dual_prompt_loss(*args, lam=lam, backend=backend)
    expected = dual_formula(*args, lam)
    for got, want, name in zip((loss, l1, l2), expected, ("loss", "l1", "l2")):
        assert torch.isfinite(got), name
        assert abs(float(got) - float(want)) <= 1e-4 * abs(float(want)) + 2e-5 * scale, name
    p_clean = ops.clean_probability(*args[:4], args[5], backend=backend)
    rows = torch.arange(n)
    margin = scale * (args[0].double() @ (args[1].double() - args[2].double()).T)[rows, args[3]]
    assert torch.isfinite(p_clean).all()
    assert (p_clean.double() - torch.sigmoid(margin)).abs().max() <= 1e-4


@PROPERTY_SETTINGS
@given(n=st.integers(0, 24), k=st.integers(0, 300), d=st.integers(1, 40), dtype=st.sampled_from(FLOATS),
       queue_dtype=st.sampled_from(FLOATS), temperature=st.floats(0.03, 1.0), bad=st.sampled_from(
           ["none", "k_rows", "queue_columns", "temperature", "integer_q"]),
       backend=st.sampled_from(backends()), seed=st.integers(0, 2**16))
def test_queue_loss_agrees_with_the_formula_or_names_the_bad_argument(n, k, d, dtype, queue_dtype, temperature, bad,
                                                                      backend, seed):
    if bad != "none":  # one fault at a time: no empty inputs besides it
        n, k = max(n, 1), max(k, 1)
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    key = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1).to(queue_dtype)
    named = {"k_rows": "k", "queue_columns": "queue", "temperature": "temperature", "integer_q": "q"}
    if bad == "k_rows":
        key = torch.cat([key, key[:1]])
    elif bad == "queue_columns":
        queue = torch.cat([queue, queue[:, :1]], dim=1)
    elif bad == "temperature":
        temperature = -temperature
    elif bad == "integer_q":
        q = (q * 10).to(torch.int64)
    if bad == "none" and n == 0:
        bad = "empty"  # error names N = 0
    elif bad == "none" and k == 0:
        bad, named["empty_queue"] = "empty_queue", "queue"
    if bad != "none":
        with pytest.raises((ValueError, TypeError)) as info:
            ops.queue_info_nce(q, key, queue, temperature, backend=backend)
        assert {**named, "empty": "N = 0"}[bad] in str(info.value)
        return
    got = ops.queue_info_nce(q, key, queue, temperature, backend=backend)
    qd, kd, Qd = q.double(), key.double(), queue.double()
    logits = torch.cat([(qd * kd).sum(1, keepdim=True), qd @ Qd.T], dim=1) / temperature
    want = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    assert torch.isfinite(got)
    assert abs(float(got) - float(want)) <= 2e-4 * abs(float(want)) + 2e-4


@PROPERTY_SETTINGS
@given(rows=st.integers(1, 40), d=st.integers(1, 8), count=st.integers(0, 60), ptr=st.integers(-3, 45))
def test_enqueue_wraps_around_or_names_the_problem(rows, d, count, ptr):
    queue = torch.zeros(rows, d)
    keys = torch.arange(1, count + 1, dtype=torch.float32)[:, None].expand(count, d).contiguous()
    if count > rows or not 0 <= ptr < rows:
        with pytest.raises((ValueError, TypeError)) as info:
            ops.enqueue(queue, keys, ptr)
        assert "keys" in str(info.value) or "ptr" in str(info.value)
        return
    new_ptr = ops.enqueue(queue, keys, ptr)
    assert new_ptr == (ptr + count) % rows
    for i in range(count):
        assert float(queue[(ptr + i) % rows, 0]) == i + 1


SECTIONS = {name: type(getattr(Config(), name)) for name in ("data", "pseudo", "phase1", "phase2", "filter", "run")}
VALUES = st.one_of(st.integers(-5, 5000), st.floats(-10, 10, allow_nan=False), st.booleans(), st.none(),
                   st.text(max_size=8), st.lists(st.integers(0, 5), max_size=3))


@settings(max_examples=200, deadline=None)
@given(section=st.sampled_from(sorted(SECTIONS)), data=st.data(), value=VALUES, misspell=st.booleans())
def test_config_overrides_are_accepted_or_name_the_key(section, data, value, misspell):
    import dataclasses

    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    name = data.draw(st.sampled_from(names))
    key = f"{section}.{name}{'_x' if misspell else ''}"
    cfg = Config()
    try:
        cfg.override([f"{key}={value}" if not isinstance(value, list) else f"{key}={value!r}"]).validate()
    except ConfigError as exc:
        assert key in str(exc) or "phase1.seeds" in str(exc) or "must" in str(exc)
        assert not misspell or key in str(exc)
        return
    assert not misspell
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # what was accepted round-trips
