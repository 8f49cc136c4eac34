"""The paths that exist for CUDA, tested on the CPU where they can be and on CUDA where present:
the host-sync-free Krotov step (`krotov_full`, two max passes), the epoch captured in a CUDA
graph, `precision` and `cuda_graphs` from config, the Gupta threshold by top-k, bf16 autocast
of the backprop families (local rules in fp32 under it), and `scripts/gpu_check.sh`'s exit
where there is no CUDA.

Tests that need CUDA have `cuda` in their names: `scripts/gpu_check.sh` runs `pytest -k cuda`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY

from bioexp.config import validate
from bioexp.data import Split
from bioexp.engine.loops import unsupervised_epoch
from bioexp.engine.schedule import Schedule, UnsupervisedPhase
from bioexp.errors import ConfigError
from bioexp.layers import KrotovLayer, LocalLayer
from bioexp.rules.hebbian import GuptaReference, kth_smallest, topk_threshold
from bioexp.rules.krotov import krotov_full, normalized_step, ranked
from bioexp.train import run

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
ROOT = Path(__file__).resolve().parent.parent


def trained_layer(device: str, steps: int = 20, batch: int = 256, hidden: int = 300,
                  p: float = 2.0, k: int = 2, fixed: bool | None = None,
                  two_max: bool | None = None) -> KrotovLayer:
    """A Krotov layer after `steps` local updates on seeded Gaussian-ish inputs."""
    g = torch.Generator().manual_seed(7)
    data = torch.rand(steps * batch, 784, generator=g)
    torch.manual_seed(0)
    layer = KrotovLayer(784, hidden, p, k).to(device)
    layer._fixed_shapes, layer._two_max = fixed, two_max
    with torch.no_grad():
        for v in data.to(device).split(batch):
            layer.local_update(v, layer(v), 0.02)
    return layer


# ---------------------------------------------------------------------------------------------
# the host-sync-free step on the CPU


def test_two_max_ranks_like_topk_without_ties() -> None:
    currents = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    for a, b in zip(ranked(currents, 2, two_max=True), ranked(currents, 2), strict=True):
        assert torch.equal(a, b)
    top = currents.topk(7, dim=1)  # k > 2: top-k whatever two_max says
    value, unit = ranked(currents, 7, two_max=True)[2:]
    assert torch.equal(value, top.values[:, 6]) and torch.equal(unit, top.indices[:, 6])


def test_normalized_step_takes_the_rate_as_a_tensor_bit_for_bit() -> None:
    ds = torch.randn(50, 30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(normalized_step(ds, 0.03), normalized_step(ds, torch.tensor(0.03)))


@pytest.mark.parametrize(("p", "k"), [(2.0, 2), (3.0, 7)])
def test_fixed_shape_step_with_two_max_stays_close_over_20_steps(p: float, k: int) -> None:
    # two max passes pick the lower unit on an exact tie, top-k may not: to fp32 tolerance.
    gather = trained_layer("cpu", p=p, k=k, fixed=False)
    fixed = trained_layer("cpu", p=p, k=k, fixed=True, two_max=True)
    assert torch.allclose(fixed.weight, gather.weight, rtol=1e-5, atol=1e-6)


def test_the_fixed_step_scatters_into_every_row() -> None:
    v = torch.rand(4, 6, generator=torch.Generator().manual_seed(2))
    w = torch.rand(10, 6, generator=torch.Generator().manual_seed(3))
    ds, winners = krotov_full(v, w, 2.0, 2, 0.4)
    assert ds.shape == w.shape and winners.shape == (4,)
    chosen = set(ranked(v @ w.T, 2)[1].tolist()) | set(ranked(v @ w.T, 2)[3].tolist())
    untouched = [h for h in range(10) if h not in chosen]
    assert torch.count_nonzero(ds[untouched]) == 0


# ---------------------------------------------------------------------------------------------
# the engine: cuda_graphs off CUDA, precision from config, summaries


def krotov_split(device: str, n: int = 600) -> Split:
    x = torch.rand(n, 784, generator=torch.Generator().manual_seed(4)).to(device)
    return Split(x, torch.zeros(n, dtype=torch.long, device=device))


def epochs_of(device: str, graphs: bool, epochs: int = 2) -> KrotovLayer:
    torch.manual_seed(0)
    layer = KrotovLayer(784, 200).to(device)
    split, generator = krotov_split(device), torch.Generator().manual_seed(5)
    phase = UnsupervisedPhase(epochs, 128, 0.05, "linear", cuda_graphs=graphs)
    for epoch in range(epochs):
        unsupervised_epoch(layer, split, phase, epoch, generator, progress=False)
    return layer


def test_cuda_graphs_off_cuda_runs_eagerly_with_one_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="bioexp.engine.loops"):
        graphed = epochs_of("cpu", graphs=True)
    assert torch.equal(graphed.weight, epochs_of("cpu", graphs=False).weight)
    assert sum("cuda_graphs=true has no effect" in r.message for r in caplog.records) == 1


def test_schedule_reads_precision_and_cuda_graphs(make_cfg) -> None:
    default = Schedule.from_cfg(make_cfg())
    assert not default.unsupervised.tf32 and not default.unsupervised.cuda_graphs
    assert default.supervised.precision == "fp32"
    bf16 = Schedule.from_cfg(make_cfg("precision=bf16", "cuda_graphs=true"))
    assert bf16.supervised.precision == "bf16" and not bf16.unsupervised.tf32
    assert bf16.unsupervised.cuda_graphs


@pytest.mark.parametrize(("overrides", "message"), [
    (("device=cpu", "cuda_graphs=true"), "cuda_graphs=true needs CUDA"),
    (("device=cpu", "precision=tf32"), "precision=tf32 needs CUDA"),
    (("device=cpu", "precision=tf32", "cuda_graphs=true"), "need CUDA"),
    (("precision=fp16",), "precision must be one of fp32, tf32, bf16"),
    (("cuda_graphs=1",), "cuda_graphs must be true or false"),
])
def test_numerics_settings_are_checked(make_cfg, overrides: tuple[str, ...],
                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate(make_cfg(*overrides))
    assert "\n" not in str(info.value)


def test_cuda_only_settings_on_auto_without_cuda(make_cfg, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"this run is on the CPU \(device=auto\)"):
        validate(make_cfg("device=auto", "cuda_graphs=true"))
    validate(make_cfg("device=cpu", "precision=bf16"))  # bf16 autocast exists on the CPU


BF16_MODELS = ["bp_mlp", "fa_mlp", "dfa_mlp", "kp_cnn", "krotov_biocell_fa"]
LOCAL_RULE_MODELS = ["krotov_fc", "krotov_biocell_fc", "semihebb", "softhebb_mlp", "softhebb_cnn"]


@pytest.fixture
def training_dtypes(monkeypatch: pytest.MonkeyPatch) -> dict[str, set]:
    """What the supervised steps compute in: the output dtypes of every module called with
    gradients on (`trained`), and the dtypes and autocast state every local rule sees (`rule`)."""
    seen: dict[str, set] = {"trained": set(), "rule": set()}

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            seen["trained"].add(output.dtype)

    def spy(update):
        def local_update(self, x, y, lr):
            seen["rule"].add((x.dtype, y.dtype, torch.is_autocast_enabled(x.device.type)))
            return update(self, x, y, lr)
        return local_update

    layers = [LocalLayer]
    while layers:
        cls = layers.pop()
        layers += cls.__subclasses__()
        if "local_update" in vars(cls):
            monkeypatch.setattr(cls, "local_update", spy(vars(cls)["local_update"]))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


@pytest.mark.parametrize("model", BF16_MODELS)
def test_backprop_families_train_under_bf16_autocast(tmp_path: Path, make_cfg, model: str,
                                                     training_dtypes) -> None:
    summary = run(make_cfg(*TINY, f"model={model}", "precision=bf16", "model.hidden=[16]"
                           if model in ("bp_mlp", "fa_mlp", "dfa_mlp") else "seed=0"), tmp_path)
    assert summary["status"] == "completed", summary
    assert summary["precision"] == "bf16" and summary["cuda_graphs"] is False
    assert torch.bfloat16 in training_dtypes["trained"]  # the steps ran under autocast


@pytest.mark.parametrize("model", LOCAL_RULE_MODELS)
def test_local_rules_stay_fp32_when_one_phase_autocasts_to_bf16(tmp_path: Path, make_cfg,
                                                                model: str, training_dtypes
                                                                ) -> None:
    """In one phase the local layers learn inside the supervised step's bf16 autocast; their
    forward pass and their rule still compute in float32."""
    summary = run(make_cfg(*TINY, f"model={model}", "schedule=one_phase", "precision=bf16",
                           "schedule.supervised.epochs=1"), tmp_path)
    assert summary["status"] == "completed", summary
    assert torch.bfloat16 in training_dtypes["trained"]  # the head under autocast
    assert training_dtypes["rule"] == {(torch.float32, torch.float32, False)}


def test_summary_records_the_default_numerics(tmp_path: Path, make_cfg) -> None:
    summary = run(make_cfg(*TINY, "model=bp_mlp", "model.hidden=[8]"), tmp_path)
    assert summary["precision"] == "fp32" and summary["cuda_graphs"] is False


# ---------------------------------------------------------------------------------------------
# the Gupta threshold


@pytest.mark.parametrize("dim", [None, 0])
def test_topk_threshold_equals_the_kth_smallest(dim: int | None) -> None:
    x = torch.randn(60, 40, generator=torch.Generator().manual_seed(6))
    n = x.numel() if dim is None else x.shape[0]
    for k in (1, 2, n // 3, n // 2 + 1, n - 1, n):
        expected = kth_smallest(x, k, dim)
        assert torch.equal(topk_threshold(x, k, dim), expected)
        assert torch.equal(kth_smallest(x, k, dim, select="topk"), expected)
        assert torch.equal(kth_smallest(x, k, dim, select="kthvalue"), expected)


# ---------------------------------------------------------------------------------------------
# the GPU check script where there is no CUDA


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: gpu_check.sh would run the whole check")
def test_gpu_check_without_cuda_says_so_in_one_line_and_fails() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert len(output.splitlines()) == 1 and "no CUDA" in output, output


# ---------------------------------------------------------------------------------------------
# on CUDA (scripts/gpu_check.sh runs these: pytest -k cuda)


@needs_cuda
@pytest.mark.parametrize(("p", "k"), [(2.0, 2), (3.0, 7)])
def test_krotov_step_on_cuda_matches_the_cpu(p: float, k: int) -> None:
    cpu = trained_layer("cpu", p=p, k=k)
    cuda = trained_layer("cuda", p=p, k=k)  # fixed shapes, two max passes: the CUDA default
    assert torch.allclose(cuda.weight.cpu(), cpu.weight, rtol=1e-4, atol=1e-5)
    assert torch.equal(cuda.wins.cpu(), cpu.wins)


@needs_cuda
def test_krotov_step_on_cuda_never_syncs_with_the_host() -> None:
    layer = KrotovLayer(784, 300).cuda()
    v = torch.rand(256, 784, device="cuda")
    layer.local_update(v, layer(v), 0.02)  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            layer.local_update(v, layer(v), torch.tensor(0.02, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_cuda_graph_epochs_match_eager_epochs() -> None:
    graphed, eager = epochs_of("cuda", graphs=True), epochs_of("cuda", graphs=False)
    assert torch.allclose(graphed.weight, eager.weight, rtol=1e-4, atol=1e-5)
    assert torch.equal(graphed.wins, eager.wins)


@needs_cuda
def test_gupta_reference_on_cuda_matches_the_cpu() -> None:
    rule = GuptaReference(60.0)
    x, y = torch.rand(32, 20), torch.rand(32, 10)
    w = torch.zeros(20, 10)
    results = {}
    for device in ("cpu", "cuda"):
        state = rule.initial_state(w.to(device))
        steps = []
        for _ in range(3):
            step, state = rule(x.to(device), y.to(device), w.to(device), state, lr=0.1)
            steps.append(step.cpu())
        results[device] = torch.stack(steps)
    assert torch.allclose(results["cuda"], results["cpu"], rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_krotov_run_on_cuda_records_its_numerics(tmp_path: Path, make_cfg,
                                                 precision: str) -> None:
    summary = run(make_cfg(*TINY, "device=cuda", "model=krotov_fc", "model.hidden=64",
                           f"precision={precision}", "cuda_graphs=true"), tmp_path)
    assert summary["status"] == "completed", summary
    assert summary["precision"] == precision and summary["cuda_graphs"] is True
    assert summary["device"].startswith("cuda")
