"""Mutual Choice with a per-latent floor (`allocation.floored_mutual_choice`): equal to a plain
stable-sort reference of the stated rule (tie rule and cut-off included), to the brute-force
maximum of the kept mass under the floor, to `mutual_choice` bit for bit at m = 0, and to itself
split over two gloo ranks."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_lens_allocation.allocation import budget, floored_mutual_choice, mutual_choice

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def floored_reference(x: torch.Tensor, k: float, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stated rule with stable sorts: per column the m largest z (lowest rows first), then
    the R largest relu(z) outside them (lowest flat index first), then relu."""
    z = x.reshape(-1, x.shape[-1])
    n, f = z.shape
    rest_budget = min(budget(n, k), n * f) - f * m
    order = torch.argsort(z, dim=0, descending=True, stable=True)[:m]
    floor = torch.zeros(n, f, dtype=torch.bool)
    floor.scatter_(0, order, True)
    rest = torch.where(floor, torch.zeros_like(z), z).relu().flatten()
    ranked = torch.argsort(rest, descending=True, stable=True)[:rest_budget]
    extra = torch.zeros(n * f, dtype=torch.bool)
    extra[ranked[rest[ranked] > 0]] = True
    kept = floor | extra.view(n, f)
    codes = (z.relu() * kept).reshape(x.shape)
    inf = torch.tensor(float("inf"), dtype=z.dtype)
    floor_cut = z.gather(0, order[-1:]).squeeze(0) if m else inf.expand(f)
    rest_cut = rest[ranked[-1]] if rest_budget else inf
    return codes, torch.minimum(floor_cut, rest_cut)


def brute_force_mass(z: torch.Tensor, k: float, m: int) -> float:
    """max sum relu(z) over the sets of at most M entries with at least m in every column."""
    n, f = z.shape
    size = min(budget(n, k), n * f)
    acts = z.relu().double().flatten().tolist()
    best = 0.0
    for chosen in itertools.combinations(range(n * f), size):
        counts = [0] * f
        for i in chosen:
            counts[i % f] += 1
        if min(counts) >= m:
            best = max(best, sum(acts[i] for i in chosen))
    return best


@st.composite
def floored_batches(draw, max_rows: int = 6, max_latents: int = 4):
    n = draw(st.integers(1, max_rows))
    f = draw(st.integers(1, max_latents))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["ties", "normal", "zero"]))
    if kind == "ties":
        low = draw(st.integers(-3, 1))
        x = torch.randint(low, low + draw(st.integers(1, 4)), (n, f), generator=generator)
    elif kind == "normal":
        x = torch.randn(n, f, generator=generator, dtype=torch.float64) + draw(st.floats(-1, 1))
    else:
        x = torch.zeros(n, f)
    if draw(st.booleans()):  # an all-zero row
        x[draw(st.integers(0, n - 1))] = 0
    m = draw(st.integers(0, n))
    k = draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, float(f)]))
    return x.to(dtype), k, m


def feasible(x: torch.Tensor, k: float, m: int) -> bool:
    n, f = x.reshape(-1, x.shape[-1]).shape
    return m <= n and f * m <= min(budget(n, k), n * f)


@settings(max_examples=300, deadline=None)
@given(floored_batches())
def test_floored_mutual_choice_is_the_stated_rule_and_maximises_the_kept_mass(batch):
    x, k, m = batch
    if not feasible(x, k, m):
        with pytest.raises(ValueError, match="floor of") as error:
            floored_mutual_choice(x, k, m)
        assert "\n" not in str(error.value)
        return
    result = floored_mutual_choice(x, k, m)
    codes, cutoff = floored_reference(x, k, m)
    assert torch.equal(result.codes, codes)
    if m == 0:
        assert torch.equal(result.cutoff, mutual_choice(x, k).cutoff)
    else:
        assert torch.equal(result.cutoff, cutoff)
        fired = (result.codes != 0).sum(0)
        positive = (x > 0).sum(0)
        assert bool((fired >= positive.clamp(max=m)).all())  # the floor holds
    if x.numel() <= 12:
        best = brute_force_mass(x.double(), k, m)
        assert result.codes.double().sum().item() == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_floor_zero_is_mutual_choice_bit_for_bit():
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(0))
    x[::7, ::3] = 0.5  # ties
    for k in (0.5, 4.0, 30.0):
        left = x.clone().requires_grad_(True)
        right = x.clone().requires_grad_(True)
        floored, plain = floored_mutual_choice(left, k, 0), mutual_choice(right, k)
        assert torch.equal(floored.codes, plain.codes)
        assert torch.equal(floored.cutoff, plain.cutoff)
        floored.codes.pow(2).sum().backward()
        plain.codes.pow(2).sum().backward()
        assert torch.equal(left.grad, right.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_paths_3d_inputs_and_gradients(dtype):
    """Past 65536 entries both kernels take their candidate paths; 3-D equals flattened; the
    gradient is 1 at the kept positive entries and 0 elsewhere."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 128, 192, generator=generator).to(dtype)
    x[0, :5] = 0  # all-zero rows
    x[1, ::4, ::5] = 0.75  # ties
    for m in (1, 3):
        leaf = x.clone().requires_grad_(True)
        result = floored_mutual_choice(leaf, 8.0, m)
        codes, cutoff = floored_reference(x, 8.0, m)
        assert torch.equal(result.codes, codes)
        assert torch.equal(result.cutoff, cutoff)
        assert torch.equal(floored_mutual_choice(x.reshape(-1, 192), 8.0, m).codes, codes.reshape(-1, 192))
        result.codes.sum().backward()
        assert torch.equal(leaf.grad, (codes != 0).to(dtype))


@pytest.mark.parametrize(
    ("shape", "k", "m", "message"),
    [((4, 3), 1.0, 2, "F \\* m = 6"), ((4, 3), 3.0, 5, "m <= N"), ((4, 3), 1.0, -1, "integer >= 0")],
)
def test_an_infeasible_floor_is_refused_in_one_line(shape, k, m, message):
    with pytest.raises(ValueError, match=message) as error:
        floored_mutual_choice(torch.randn(*shape), k, m)
    assert "\n" not in str(error.value)


# --- two gloo ranks ------------------------------------------------------------------------


def _rank_batches() -> list[tuple[torch.Tensor, float, int, int]]:
    """(z, k, m, rows of rank 0): ties, zero rows, uneven splits, both kernels' fast paths."""
    g = torch.Generator().manual_seed(3)
    ties = torch.randint(-2, 3, (24, 6), generator=g).float()
    ties[5] = 0
    large = torch.randn(640, 256, generator=g)
    large[::9, ::7] = 1.25
    return [
        (ties, 2.0, 1, 11),
        (ties, 3.0, 2, 12),
        (torch.randn(40, 8, generator=g), 1.5, 3, 7),
        (large, 6.0, 2, 320),
        (large, 6.0, 0, 301),
    ]


def _floor_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from sae_lens_allocation.allocation import BatchGroup

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    torch.set_num_threads(1)
    group = BatchGroup.from_default_group()
    results = []
    for z, k, m, split in _rank_batches():
        rows = z[:split] if rank == 0 else z[split:]
        leaf = rows.clone().requires_grad_(True)
        allocation = group.floored_mutual_choice(leaf, k, m)
        allocation.codes.sum().backward()
        results.append((allocation.codes.detach(), allocation.cutoff, leaf.grad))
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(
        _floor_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("gloo workers did not finish within 300 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, (z, k, m, _) in enumerate(_rank_batches()):
        leaf = z.clone().requires_grad_(True)
        single = floored_mutual_choice(leaf, k, m)
        single.codes.sum().backward()
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), single.codes)
        assert torch.equal(torch.cat([ranks[0][i][2], ranks[1][i][2]]), leaf.grad)
        for r in range(2):
            assert torch.equal(ranks[r][i][1], single.cutoff)


# --- the mutual_choice SAE with min_tokens_per_latent ----------------------------------------


def _floored_sae(**fields):
    from support import plugin_sae

    return plugin_sae("mutual_choice", d_in=16, d_sae=64, k=4.0, b_enc_std=0.1, uneven_decoder=True,
                      **fields)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_a_bad_floor_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="min_tokens_per_latent") as error:
        _floored_sae(min_tokens_per_latent=value)
    assert "\n" not in str(error.value)


def test_a_batch_too_small_for_the_floor_is_refused_naming_the_field():
    from sae_lens_allocation import MutualChoiceTrainingSAEConfig

    cfg = MutualChoiceTrainingSAEConfig(d_in=16, d_sae=64, k=4.0, min_tokens_per_latent=2)
    cfg.check_batch_tokens(32)  # floor(4 * 32) = 128 = 64 * 2
    with pytest.raises(ValueError, match="min_tokens_per_latent=2 is not allowed.*m <= 1") as error:
        cfg.check_batch_tokens(31)
    assert "\n" not in str(error.value)


def test_floor_zero_keeps_todays_sae():
    plain, floored = _floored_sae(), _floored_sae(min_tokens_per_latent=0)
    assert plain.state_dict().keys() == floored.state_dict().keys()


def test_training_codes_are_the_floored_rule_and_the_export_keeps_the_floor(tmp_path):
    from sae_lens import SAE

    from sae_lens_allocation import calibrate
    from sae_lens_allocation.saes.calibration import document_folds, feature_choice_thresholds

    from support import training_step

    sae = _floored_sae(min_tokens_per_latent=2)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(5))
    output = training_step(sae, x)
    assert torch.equal(output.feature_acts, floored_mutual_choice(output.hidden_pre, 4.0, 2).codes)
    assert int(sae.floor_tokens) == 128
    rows = torch.randn(2048, 16, generator=torch.Generator().manual_seed(6))
    calibrate(sae, rows.view(64, 32, 16))
    stats = sae.cfg.metadata.calibration
    assert stats["in_sample_l0"] == pytest.approx(4.0, abs=0.01)
    assert stats["floor_target_l0"] == pytest.approx(64 * 2 / 128)
    # theta_j = min(theta, phi_j): at most one value below the floor's thresholds, phi_j
    # computed as calibrate_thresholds does (sequences as documents, rows ordered by fold).
    folds = document_folds(torch.arange(2048) // 32, 5, 0)
    order = torch.argsort(folds, stable=True)
    phi, _ = feature_choice_thresholds(sae._z_block(rows[order]), torch.full((64,), 2 / 128),
                                       folds[order], 1 << 20)
    theta = sae.threshold
    assert bool((theta <= phi).all())
    assert torch.unique(theta[theta < phi]).numel() == 1
    sae.eval()
    sae.save_inference_model(tmp_path)
    exported = SAE.load_from_disk(tmp_path)
    torch.testing.assert_close(exported.encode(rows), sae.encode(rows), rtol=1e-4, atol=1e-5)
