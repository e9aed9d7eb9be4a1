"""DDP on the CPU (2 processes, gloo): every rank trains, schedules, finalises and stops on a fault identically.

The runs are in ``tests/ddp_worker.py``, launched once as a subprocess (Lightning's DDP launcher re-runs it for rank
1); each rank saves what it saw and the tests compare the two ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_prune import budget_count

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = WORKER.parent.parent
SCENARIOS = ("fit", "nan_loss_rank1", "nan_latent_rank1", "unused_on_rank1")
# about 20 s on 2 cores, minutes on a loaded machine; without a limit, a rank left waiting for the other would hang
# until gloo's 30 min timeout
TIMEOUT_S = 300
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    process = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *SCENARIOS],
        cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the rank it started
        log, _ = process.communicate()
        pytest.fail(f"the DDP run did not finish in {TIMEOUT_S} s (a rank waiting for the other?):\n{log[-4000:]}")
    assert process.returncode == 0, log[-4000:]
    results = {}
    for scenario in SCENARIOS:
        files = [out / f"{scenario}.rank{r}.pt" for r in (0, 1)]
        assert all(f.exists() for f in files), f"{scenario}: a rank saved nothing\n{log[-4000:]}"
        results[scenario] = [torch.load(f, weights_only=False) for f in files]
    return results


def test_it_really_ran_two_gloo_processes(ranks):
    a, b = ranks["fit"]
    assert (a["rank"], b["rank"]) == (0, 1)
    assert a["world_size"] == b["world_size"] == 2
    assert a["backend"] == b["backend"] == "gloo"
    assert "error" not in a and "error" not in b, a.get("traceback") or b.get("traceback")
    assert a["global_step"] == b["global_step"] == 20 == len(a["steps"]) == len(b["steps"])


def test_schedules_budget_gradient_and_latents_agree_at_every_step(ranks):
    a, b = ranks["fit"]
    for sa, sb in zip(a["steps"], b["steps"]):
        step = sa["global_step"]
        assert sa["schedule"] == sb["schedule"], step  # λ, T, target keep share
        assert sa["buffers"] == sb["buffers"], step  # T, c and T_grad of every mask
        for ga, gb in zip(sa["grads"], sb["grads"]):  # the task gradient, all-reduced
            assert torch.equal(ga, gb), step
        for la, lb in zip(sa["latents"], sb["latents"]):
            assert torch.equal(la, lb), step
    # the schedules did move: the comparison above is not between constants
    assert a["steps"][0]["schedule"] != a["steps"][-1]["schedule"]
    assert any(s["schedule"][0] not in (None, [0.0]) for s in a["steps"])  # the budget loop did act


def test_the_budget_step_is_taken_on_every_rank_in_the_direction_of_lambda(ranks):
    """The budget step itself, under DDP: the latents just before and just after BudgetCallback's hook. λ > 0 shrinks
    weights toward 0 (never past it), λ < 0 grows them, λ = 0 leaves them; the same on both ranks. A step skipped or
    taken with the wrong sign under DDP would leave the ranks equal, so equality alone cannot show it."""
    a, b = ranks["fit"]
    shrinking = 0
    for sa, sb in zip(a["steps"], b["steps"]):
        step, lam = sa["global_step"], sa["schedule"][0]
        for before, after, before_b, after_b in zip(sa["before_budget"], sa["after_budget"], sb["before_budget"],
                                                    sb["after_budget"]):
            assert torch.equal(before, before_b) and torch.equal(after, after_b), step
            assert bool((before * after >= 0).all()), step  # no weight crosses 0
        before = torch.cat([t.flatten() for t in sa["before_budget"]]).abs()
        after = torch.cat([t.flatten() for t in sa["after_budget"]]).abs()
        if lam is None or lam == [0.0]:
            assert torch.equal(before, after), step
        elif lam[0] > 0:
            assert bool((after <= before).all()) and bool((after < before).any()), step
            shrinking += 1
        else:
            assert bool((after >= before).all()) and bool((after > before).any()), step
    assert shrinking >= 3  # the loop did act, on several steps


def test_finalised_masks_are_identical_and_the_budget_is_exact(ranks):
    a, b = ranks["fit"]
    assert all(a["hard"]) and all(b["hard"])
    assert a["scales"] == b["scales"]  # computed from each rank's own initial weights, then broadcast by DDP
    assert a["latents"].keys() == b["latents"].keys()
    for name in a["latents"]:
        assert torch.equal(a["latents"][name], b["latents"][name]), name
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    total = sum(m.numel() for m in a["masks"].values())
    kept = sum(int(m.sum()) for m in a["masks"].values())
    assert kept == budget_count(total, 0.8)


def test_callback_state_and_report_are_identical(ranks):
    """Including the accuracies measured at finalisation on the validation loader, which DDP shards per rank."""
    a, b = ranks["fit"]
    assert a["callback_state"]["finalized"] and a["callback_state"]["report"]["val_after_cut"]
    assert a["callback_state"] == b["callback_state"]


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_same_error(ranks):
    for result in ranks["nan_loss_rank1"]:
        assert result["error"][0] == "NonFiniteError", result["traceback"]
        assert "on rank 1 at step 3" in result["error"][1]
        assert result["global_step"] == 3
        assert all(torch.isfinite(t).all() for t in result["latents"].values())


def test_a_nan_latent_on_one_rank_stops_every_rank_with_the_same_error(ranks):
    for result in ranks["nan_latent_rank1"]:
        assert result["error"][0] == "NonFiniteError", result["traceback"]
        assert "'backbone.features.2.weight' has non-finite latent weights on rank 1 after step 5" in result["error"][1]
        assert result["global_step"] == 5


def test_a_layer_that_one_rank_does_not_reach_gets_the_same_update_on_both(ranks):
    """With find_unused_parameters=True, a layer only rank 0's loss uses: the budget step, taken after the all-reduce
    from a sample drawn with the same seed on every rank, keeps every gradient and latent identical."""
    a, b = ranks["unused_on_rank1"]
    assert "error" not in a and "error" not in b, a.get("traceback") or b.get("traceback")
    assert len(a["latents"]) == len(ranks["fit"][0]["latents"]) + 1  # the extra layer is pruned too
    for sa, sb in zip(a["steps"], b["steps"]):
        for ga, gb in zip(sa["grads"], sb["grads"]):
            assert torch.equal(ga, gb), sa["global_step"]
        for la, lb in zip(sa["latents"], sb["latents"]):
            assert torch.equal(la, lb), sa["global_step"]
