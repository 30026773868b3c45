"""Data parallelism: a 2-process gloo run through torchrun ends with the weights of a 1-process run
at the same global batch; the per-example randomness and loss scaling behind it; SyncBatchNorm1d."""
import json
import shutil

import numpy as np
import pytest
import torch

from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.models.joint import BatchKey, JointDiffusion, counter_timesteps
from jdm_fast.ops.philox import normal_stream
from jdm_fast.training.config import get_preset
from jdm_fast.training.distributed import convert_sync_batchnorm, SyncBatchNorm1d

from _runs import final_state, global_rel_diff, max_rel_diff, run, train_cmd


def _model(seed=0):
    cfg = get_preset("tiny").model
    torch.manual_seed(seed)
    return JointDiffusion(cfg, GaussianDiffusion(make_betas("jdm_linear", 50)))


def test_timesteps_are_a_function_of_the_global_example_index():
    full = counter_timesteps(7, 1000, 16, 50)
    assert np.array_equal(np.concatenate([counter_timesteps(7, 1000, 9, 50), counter_timesteps(7, 1009, 7, 50)]), full)
    assert full.min() >= 0 and full.max() < 50 and len(set(full.tolist())) > 5
    assert not np.array_equal(counter_timesteps(8, 1000, 16, 50), full)  # the seed matters


def test_two_shards_draw_the_slices_of_the_global_batch(monkeypatch):
    """Shards [0, 8) and [8, 16) of step 3 see exactly the timesteps and noise of the 16-example batch,
    and the mean over shards of their (scaled) losses is the global batch's loss."""
    model = _model().eval()  # eval: head BN on running statistics, so shard and full batch agree
    seen = []
    original = model.diffusion.q_sample_keyed

    def spy(x0, t, seed, first_example):
        x_t, noise = original(x0, t, seed, first_example)
        seen.append((t.clone(), noise.clone()))
        return x_t, noise

    monkeypatch.setattr(model.diffusion, "q_sample_keyed", spy)
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    y = torch.tensor([3, -1, 4, 1, 5, -1, 2, 6, 5, 3, 5, -1, 9, 7, 9, 3])
    labelled = int((y >= 0).sum())
    with torch.no_grad():
        full = model(x, y, key=BatchKey(11, 3, 0, 16, labelled))
        halves = [model(x[s:s + 8], y[s:s + 8], key=BatchKey(11, 3, s, 16, labelled)) for s in (0, 8)]
    (t_full, n_full), (t0, n0), (t1, n1) = seen
    assert torch.equal(torch.cat([t0, t1]), t_full) and torch.equal(torch.cat([n0, n1]), n_full)
    ref = normal_stream(11, 3 * 16 * 784, 16 * 784).reshape(16, 1, 28, 28)
    np.testing.assert_array_equal(n_full.numpy(), ref)  # the documented Philox stream at the global offset
    np.testing.assert_array_equal(t_full.numpy(), counter_timesteps(11, 3 * 16, 16, 50))  # the NumPy reference
    for term in ("total", "diffusion", "classifier"):
        mean = (getattr(halves[0], term) + getattr(halves[1], term)) / 2
        torch.testing.assert_close(mean, getattr(full, term), rtol=1e-5, atol=1e-6, msg=term)


@pytest.mark.parametrize("augmented", [False, True], ids=["x0", "x_cls"])
def test_keyed_training_loss_compiles_to_one_graph_for_every_step(augmented):
    """The trainer compiles ``model(x, y, key=..., x_cls=...)`` (CUDA default; x_cls: the loader's
    augmented copy, or none with --no-augment). Timesteps, head-dropout masks and noise are drawn by
    ops that read the batch's first global example index from a device tensor (``BatchKey.first``),
    so the keyed loss traces with ``fullgraph=True`` (no graph break) and one graph serves every step
    (no recompilation as the step changes); values equal eager."""
    from torch._dynamo.utils import counters

    model = _model().train()
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    y = torch.tensor([3, -1, 4, 1, 5, 9, 2, 6])
    extra = {"x_cls": x.flip(-1)} if augmented else {}
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    try:
        for step in range(4):
            key = BatchKey(7, step, 0, 8, 7, first=torch.tensor(step * 8))
            got, want = compiled(x, y, key=key, **extra), model(x, y, key=key, **extra)
            for term in ("total", "diffusion", "classifier"):
                torch.testing.assert_close(getattr(got, term), getattr(want, term), rtol=1e-6, atol=1e-7, msg=term)
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
    assert (graphs, breaks) == (1, 0)


def test_head_dropout_masks_are_the_documented_counter_stream():
    """Element (g, j) of head Dropout layer k is kept iff counter_uniform(seed, DROP + k)[g, j] >= p
    (jdm_fast.ops.philox), so a shard's rows are the global batch's rows, every step differs, and
    about a fraction p is dropped."""
    from jdm_fast.models.joint import _DROPOUT_TAG
    from jdm_fast.ops.philox import counter_uniform

    model = _model().train()
    p = model.head.net[0].p
    full = model._head_dropout_masks(5, torch.tensor(24), 12)
    part = model._head_dropout_masks(5, torch.tensor(28), 8)
    assert len(full) == 2 and all(m is not None for m in full)
    widths = [model.head.in_features, model.head.in_features // 2]
    for k, (f, q, width) in enumerate(zip(full, part, widths)):
        assert torch.equal(f[4:], q)
        keep = counter_uniform(5, _DROPOUT_TAG + k, 24, 12, width) >= p
        np.testing.assert_array_equal(f.numpy(), keep.astype(np.float32) / np.float32(1 - p))
        assert abs((f == 0).float().mean().item() - p) < 0.1
    other = model._head_dropout_masks(5, torch.tensor(36), 12)
    assert not torch.equal(full[0], other[0])


def test_sync_batchnorm_is_batchnorm_outside_a_process_group():
    bn = torch.nn.BatchNorm1d(6)
    bn.running_mean.fill_(0.5)
    holder = torch.nn.Sequential(bn)
    convert_sync_batchnorm(holder)
    assert isinstance(holder[0], SyncBatchNorm1d) and holder[0].state_dict().keys() == bn.state_dict().keys()
    assert torch.all(holder[0].running_mean == 0.5)
    x = torch.randn(10, 6)
    torch.testing.assert_close(holder[0](x), torch.nn.functional.batch_norm(
        x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))


@pytest.fixture(scope="module", params=["--no-augment", "--augment"])
def one_and_two_process_runs(request, tmp_path_factory):
    """The same 6 steps run by 1 process (batch 16) and by torchrun with 2 gloo processes (2 x 8),
    UNet dropout 0.3 (keyed masks), augmentation off or on, checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp(request.param.lstrip("-"))
    args = [request.param, "--dropout", "0.3", "--steps", "6", "--save-every", "3", "--labelled-fraction", "0.3"]
    one = run(train_cmd(*args, "--out", str(tmp / "one")))
    two = run(train_cmd(*args, "--out", str(tmp / "two"), nproc=2))
    return request.param, args, tmp, one, two


def _assert_same_weights(a: dict, b: dict, what: str) -> None:
    for part in ("model", "ema"):
        total, worst = global_rel_diff(a[part], b[part]), max_rel_diff(a[part], b[part])
        print(f"{what} {part}: ||diff||/||w|| = {total:.2e}, worst tensor max-relative {worst:.2e}")
        assert total <= 1e-4 and worst <= 1e-2, (part, total, worst)


def test_two_process_run_matches_one_process_run(one_and_two_process_runs):
    """torchrun with 2 gloo processes (global batch 16 = 2 x 8) against 1 process (batch 16), with
    UNet and head dropout on (their masks are counter-based: the same for an example whichever
    process holds it), augmentation off and on
    (on: the loader's per-example keyed draws, the same whichever process holds an example), and
    30% of the labels, so the processes hold different numbers of labelled examples.

    Bound: ||w2 - w1|| / ||w1|| <= 1e-4 over the whole model (measured ~1e-6). Per tensor, the
    zero-initialised output convolutions, whose values are only a few Adam steps (lr * g / |g|),
    sit at the float noise floor of ~5e-4 max-relative: the same as one process run with 1 vs 2
    threads. Without SyncBatchNorm, or with a mean of per-process classifier means, both measures
    are ~1e-2 and ~1 respectively; so are they (1.4e-2, 1.9) between two augmented 1-process runs
    whose augmentation draws differ (another key), what per-process draws would give."""
    augment, _, tmp, one, two = one_and_two_process_runs
    assert "data parallel: 2 processes (gloo), global batch 16 = 2 x 8" in two.stdout
    assert two.stdout.count("final (step 6)") == 1 and one.stdout.count("final (step 6)") == 1  # rank 0 alone logs
    a, b = final_state(tmp / "one"), final_state(tmp / "two")
    assert a["config"]["augment"] == b["config"]["augment"] == (augment == "--augment")
    assert a["step"] == b["step"] == 6 and b["world_size"] == 2 and len(b["rng"]) == 2
    _assert_same_weights(a, b, f"2-process vs 1-process ({augment})")
    metrics = [json.loads(line) for line in (tmp / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in metrics if e["kind"] == "train"] == [2, 4, 6]
    ref = [json.loads(line) for line in (tmp / "one" / "metrics.jsonl").read_text().splitlines()]
    for m, r in zip(metrics, ref):  # logged losses are global means too
        if m["kind"] == "train":
            assert m["loss"] == pytest.approx(r["loss"], rel=1e-4) and m["train_acc"] == r["train_acc"]


def test_a_two_process_checkpoint_resumes_in_one_process(one_and_two_process_runs, tmp_path):
    """The 2-process run's step-3 checkpoint, resumed by 1 process to step 6, ends where the
    uninterrupted 1-process run does (UNet dropout off): data, augmentation, timesteps, noise and
    head dropout are keyed by the example, not by the process that drew them."""
    augment, args, tmp, _, _ = one_and_two_process_runs
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(tmp / "two" / "checkpoint.prev.pt", out / "checkpoint.pt")
    assert final_state(out)["step"] == 3 and final_state(out)["world_size"] == 2
    resumed = run(train_cmd(*args, "--out", str(out), "--resume"))
    assert "written by 2 process(es), this run has 1" in resumed.stdout and "resumed from" in resumed.stdout
    _assert_same_weights(final_state(tmp / "one"), final_state(out), f"2 processes to step 3, then 1 ({augment})")
