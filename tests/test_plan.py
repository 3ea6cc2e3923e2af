"""The planner (helpers/plan.py): plans scale as their counted work, a setting a free T4 cannot hold is
said before anything runs with the parameter to lower, the calibration is measured once per hardware and
reused, and a watched step's predicted and measured numbers land in run.json."""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from transformers import LlamaConfig

from helpers import plan
from helpers.run import read_run_json
from helpers.saes import TrainConfig
from helpers.sweep.plan import ModelSpec, StudySize, plan_rows

D32 = plan.ModelNumbers(1_880_000_000, 32, 2048, 65_536, 2048, 4, "nanochat")
SMALL = plan.ModelNumbers(135_000_000, 30, 576, 49_152, 192, 4, "llama")


OTHERS_NOW = plan.others_now


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch):
    """Plans made as on an idle machine (no other running threads), whatever the load of the test machine:
    the tests that need a load set one."""
    monkeypatch.setattr(plan, "others_now", lambda *_, **__: 0.0)


@pytest.fixture
def calibration(tmp_path):
    """Fixed rates (no measuring): the plans' arithmetic is checked exactly."""
    rates = plan.Rates(1e11, 1e11, 1e10, "fixed for the test")
    return plan.Calibration(rates, "test hardware", tmp_path / "calibration.json")


def test_plans_scale_as_their_counted_work(calibration):
    run = plan.SaeRun(expansion=4, train_tokens=65_536, batch_size=512)
    one = plan.plan_sae_training(SMALL, calibration, "cpu", n_saes=2, train=run, stored_tokens=10_000)
    longer = dataclasses.replace(run, train_tokens=131_072)
    two = plan.plan_sae_training(SMALL, calibration, "cpu", n_saes=2, train=longer, stored_tokens=10_000)
    init = 2 * 2 * 576 * 2304 * 10_000  # each SAE's init sample (all 10,000 stored tokens) encoded twice
    assert one.work["flops"] == 2 * (12 * 576 * 2304 * 65_536 + init)
    assert two.work["flops"] == 2 * (12 * 576 * 2304 * 131_072 + init)
    assert 1.9 * one.counted_seconds < two.counted_seconds < 2 * one.counted_seconds
    wider = dataclasses.replace(run, expansion=8)
    wide = plan.plan_sae_training(SMALL, calibration, "cpu", n_saes=2, train=wider, stored_tokens=10_000)
    assert wide.work["disk_bytes"] > 1.9 * one.work["disk_bytes"]

    base = dict(n_completions=64, prompt_tokens=40, new_tokens=24, batch_size=32)
    sampled = plan.plan_sampling(SMALL, calibration, "cpu", **base)
    doubled = plan.plan_sampling(SMALL, calibration, "cpu", **{**base, "n_completions": 128})
    assert doubled.counted_seconds == pytest.approx(2 * sampled.counted_seconds)
    # Decoding reads every weight once per step: 2 batches x (24 new tokens + the prefill).
    assert sampled.work["bytes_read"] == 2 * 25 * SMALL.weights_bytes()
    corpus = plan.plan_corpus(
        SMALL, calibration, "cpu", tokens=32_768, seq_len=128, batch_size=16, n_layers_stored=1
    )
    assert corpus.disk_gb == pytest.approx(32_768 * 576 * 2 / 1e9)
    assert corpus.fits_t4() and sampled.fits_t4() and not corpus.warnings


def test_a_setting_a_free_t4_cannot_hold_names_the_parameter_to_lower(calibration):
    big = plan.plan_sae_training(
        D32, calibration, "cpu", n_saes=1, train=plan.SaeRun(64, 1_000_000, 4096), stored_tokens=0
    )
    assert big.t4["gpu_gib"] > plan.T4_VRAM_GIB and not big.fits_t4()
    assert any("GPU memory" in w and "lower EXPANSION" in w for w in big.warnings), big.warnings
    assert "WARNING" in str(big) and "lower EXPANSION" in str(big)

    forever = plan.plan_sae_training(
        D32, calibration, "cpu", n_saes=45, train=plan.SaeRun(8, 10**11, 4096), stored_tokens=0
    )
    assert any("hours" in w and "lower TRAIN_TOKENS" in w for w in forever.warnings), forever.warnings

    huge = plan.ModelNumbers(8_000_000_000, 32, 4096, 128_000, 1024, 2, "llama")
    sampled = plan.plan_sampling(
        huge, calibration, "cpu", n_completions=8, prompt_tokens=30, new_tokens=8, batch_size=8
    )
    assert any("smaller MODEL in notebook 01" in w for w in sampled.warnings), sampled.warnings

    with pytest.raises(ValueError, match="non-negative"):
        plan.plan_corpus(SMALL, calibration, "cpu", tokens=-1, seq_len=128, batch_size=8, n_layers_stored=1)


def test_calibration_is_measured_once_per_hardware_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("NB_PLAN_CALIBRATION", raising=False)
    first = plan.calibrate("cpu", tmp_path)
    assert first.measured_now and first.rates.flops_fp32 > 0 and first.rates.bytes_per_s > 0
    stored = json.loads((tmp_path / plan.CALIBRATION_FILE).read_text())
    assert list(stored) == [plan.hardware_key("cpu")]
    again = plan.calibrate("cpu", tmp_path)
    assert not again.measured_now and again.rates == first.rates

    # Runs of a step at one size: their median measured/counted ratio multiplies later plans of that step.
    for counted, seconds in ((10.0, 30.0), (11.0, 33.0), (10.5, 40.0)):
        plan.learn(again, "corpus", {"counted": counted, "seconds": seconds, "ram_extra_gb": 0.25})
    later = plan.calibrate("cpu", tmp_path)
    assert later.line("corpus").slope == 3.0 and later.extra_ram("corpus") == 0.25
    assert later.line("corpus", "cpu_seconds") is None  # no CPU time recorded: no CPU-time prediction
    p = plan.plan_corpus(SMALL, later, "cpu", tokens=4096, seq_len=64, batch_size=8, n_layers_stored=1)
    assert p.seconds == pytest.approx(3.0 * p.counted_seconds) and "ratio 3.00" in p.note
    assert p.ram_gb == pytest.approx(p.counted_ram_gb + 0.25) and p.cpu_seconds is None

    # Runs counted by another version of the counts are dropped, the rates kept.
    stored = json.loads((tmp_path / plan.CALIBRATION_FILE).read_text())
    stored[plan.hardware_key("cpu")]["counts_version"] = plan.COUNTS_VERSION - 1
    (tmp_path / plan.CALIBRATION_FILE).write_text(json.dumps(stored))
    older = plan.calibrate("cpu", tmp_path)
    assert older.runs == {} and older.rates == first.rates and not older.measured_now

    (tmp_path / plan.CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="delete it"):
        plan.calibrate("cpu", tmp_path)
    assert (tmp_path / plan.CALIBRATION_FILE).read_text() == "{not json", (
        "a corrupt file is never overwritten"
    )


def test_a_watched_step_records_predicted_and_measured_in_run_json(tmp_path, calibration):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plan.record_model(run_dir, SMALL)
    assert plan.run_model(run_dir) == SMALL
    p = plan.plan_corpus(SMALL, calibration, "cpu", tokens=4096, seq_len=64, batch_size=8, n_layers_stored=1)
    watching = plan.watch(run_dir, p, calibration, "cpu")
    held = np.ones(50_000_000, dtype=np.uint8)  # 50 MB held during the step: the peak must see it
    record = watching.done(quiet=True)
    del held
    kept = read_run_json(run_dir)["plans"]["corpus"]
    assert kept["predicted"]["seconds"] == pytest.approx(p.seconds)
    assert kept["measured"]["ram_gb"] >= 0.05 and kept["measured"]["seconds"] > 0
    assert kept["ratio"]["ram_gb"] == pytest.approx(kept["measured"]["ram_gb"] / p.ram_gb)
    assert record["hardware"] == "test hardware" and read_run_json(run_dir)["plans"]["model"]["n_params"]
    assert kept["measured"]["cpu_seconds"] > 0 and len(kept["load_average"]) == 2
    (run,) = calibration.runs["corpus"]
    assert run["seconds"] == pytest.approx(kept["measured"]["seconds"], rel=1e-3)
    assert run["counted"] == pytest.approx(p.counted_seconds, rel=1e-3)
    assert run["load"] == max(x for x in kept["load_average"] if x is not None)
    assert run["ram_extra_gb"] == pytest.approx(kept["measured"]["ram_gb"] - p.counted_ram_gb, abs=1e-3)
    assert 0 <= kept["waited_seconds"] <= kept["measured"]["seconds"]
    assert run["waited"] == pytest.approx(kept["waited_seconds"], rel=1e-3, abs=1e-6)


def test_a_fixed_part_fitted_at_two_sizes_carries_to_a_third(calibration):
    # Runs at two sizes, 6 s of fixed costs + 2.5 x the counted time (CPU time: 4 s + 4 x, two threads).
    for counted in (1.0, 8.0, 8.2, 1.1):
        run = {"counted": counted, "seconds": 6 + 2.5 * counted, "cpu_seconds": 4 + 4 * counted}
        plan.learn(calibration, "probes", run)
    line = calibration.line("probes")
    assert (line.fixed, line.slope, line.runs, line.sizes) == (pytest.approx(6), pytest.approx(2.5), 4, 2)
    stats = plan.ProbeStats(n_folds=5, n_permutations=99, n_bootstrap=200, feature_permutations=499)
    p = plan.plan_probes(
        SMALL, calibration, "cpu", n_completions=200, n_layers=1, sae_widths=[2304], stats=stats
    )
    assert p.seconds == pytest.approx(6 + 2.5 * p.counted_seconds)
    assert p.cpu_seconds == pytest.approx(4 + 4 * p.counted_seconds)
    assert "6.0 s fixed + 2.50 x counted" in p.note and "CPU time" in str(p)
    # The same counts with ten times the permutations: the fixed part stays, the rest grows.
    more = plan.plan_probes(
        SMALL,
        calibration,
        "cpu",
        n_completions=200,
        n_layers=1,
        sae_widths=[2304],
        stats=plan.ProbeStats(5, 990, 2000, 4990),
    )
    assert more.counted_seconds > 9 * p.counted_seconds
    assert more.seconds == pytest.approx(6 + 2.5 * more.counted_seconds)

    # What a line cannot show is not invented: time that does not grow is all fixed, and a line that
    # would start below zero goes through zero.
    flat = plan.fit_line([(1.0, 6.0), (4.0, 5.0), (9.0, 4.0)])
    assert (flat.fixed, flat.slope) == (5.0, 0.0)
    through_zero = plan.fit_line([(1.0, 0.5), (4.0, 6.0)])
    assert through_zero.fixed == 0 and through_zero.slope == pytest.approx((0.5 + 24) / 17)
    assert plan.fit_line([]) is None and plan.fit_line([(0.0, 3.0)]) is None


def test_the_collection_plan_counts_the_records_tokens(calibration):
    records = [{"prompt_token_ids": [1] * 30, "completion_token_ids": [2] * 10}] * 6
    records += [{"prompt_token_ids": [1] * 50, "completion_token_ids": [2] * 30}] * 2
    p = plan.plan_collection(SMALL, calibration, "cpu", records=records, batch_size=4, n_layers_stored=2)
    assert p.work["flops"] == 2 * SMALL.n_params * 8 * (35 + 15)  # mean prompt 35, mean answer 15
    assert p.disk_gb == pytest.approx(2 * 8 * 15 * 576 * 2 / 1e9)  # the answers' tokens, fp16, per layer
    with_prompt = plan.plan_collection(
        SMALL, calibration, "cpu", records=records, batch_size=4, n_layers_stored=2, include_prompt=True
    )
    assert with_prompt.disk_gb == pytest.approx(p.disk_gb * 50 / 15)


def test_run_model_of_an_older_run_and_of_none(tmp_path):
    (tmp_path / "run.json").write_text(
        json.dumps({"model": {"n_layers": 4, "d_model": 64, "dtype": "float16"}})
    )
    older = plan.run_model(tmp_path)
    assert (older.n_params, older.bytes_per_param) == (12 * 64 * 64 * 4, 2)
    with pytest.raises(ValueError, match="run notebooks 01 and 02"):
        plan.run_model(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        plan.sae_widths([tmp_path])


def test_the_sweep_plan_names_what_to_do_with_a_model_a_free_t4_cannot_hold(tmp_path):
    # 8.6B parameters in two wide layers (few modules: cheap to count on the meta device).
    big = LlamaConfig(hidden_size=16384, intermediate_size=65536, num_hidden_layers=2, num_attention_heads=32)
    big.save_pretrained(tmp_path / "big")
    work = StudySize(100, 64, 32, 10_000, 9, 2_000_000, 8, 3)
    rates = plan.Rates(1e11, 1e11, 1e10, "fixed for the test")
    (row,) = plan_rows([ModelSpec(str(tmp_path / "big"), name="big")], work, [0.5], device="cpu", rates=rates)
    assert row.fits_t4 is False and "DROP = ['big']" in row.note


def test_mapped_weights_not_read_yet_count_until_touched(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\1" * 32 * 2**20)
    before = plan.unread_weights()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert plan.unread_weights() - before >= 30 * 2**20  # mapped, not read: not in RSS yet
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == 32 * 2**20 // 4096  # read every page
        assert plan.unread_weights() - before < 2**20


def test_counted_work_grows_with_the_saes_and_the_pooled_layers_at_the_same_steps(calibration):
    """Twelve SAEs of 32 steps cost more than one of 128 (the same optimiser steps x width): each SAE reads
    and encodes its init sample twice and writes its checkpoints and copy; and collection's pooled vectors
    grow with the stored layers at the same tokens. Notebook 03's TrainConfig is taken as it is."""
    many = TrainConfig(expansion=2, train_tokens=2048, batch_size=64, checkpoint_every=8)
    one = TrainConfig(expansion=8, train_tokens=3 * 2048, batch_size=3 * 64, checkpoint_every=8)
    twelve = plan.plan_sae_training(SMALL, calibration, "cpu", n_saes=12, train=many, stored_tokens=5000)
    single = plan.plan_sae_training(SMALL, calibration, "cpu", n_saes=1, train=one, stored_tokens=5000)
    steps = 12 * 12 * 576 * 1152 * 2048
    assert steps == 12 * 576 * 4608 * 6144  # the same training FLOPs
    assert twelve.work["flops"] - steps == 3 * (single.work["flops"] - steps)  # 12 x a quarter as wide
    assert twelve.counted_seconds > 1.5 * single.counted_seconds, (twelve.work, single.work)
    checkpointed = dataclasses.replace(plan.SaeRun(2, 2048, 64), checkpoint_every=4)
    often = plan.plan_sae_training(
        SMALL, calibration, "cpu", n_saes=1, train=checkpointed, stored_tokens=5000
    )
    rarely = plan.plan_sae_training(
        SMALL, calibration, "cpu", n_saes=1, train=plan.SaeRun(2, 2048, 64, 32), stored_tokens=5000
    )
    assert often.work["bytes_read"] - rarely.work["bytes_read"] == 7 * 3 * often.work["disk_bytes"]

    records = [{"prompt_token_ids": [1] * 30, "completion_token_ids": [2] * 16} for _ in range(44)]
    two = plan.plan_collection(SMALL, calibration, "cpu", records=records, batch_size=8, n_layers_stored=2)
    one_layer = plan.plan_collection(
        SMALL, calibration, "cpu", records=records, batch_size=8, n_layers_stored=1
    )
    assert two.work["ops"] - one_layer.work["ops"] == 44 * plan.POOLED_OPS + 6 * 20  # + 6 batches


def test_the_corpus_forward_is_counted_to_the_deepest_stored_layer_only(calibration):
    """The capture stops after the deepest layer it stores: a corpus stored at layer 6 of 30 runs 7 layers."""
    args = dict(tokens=4096, seq_len=64, batch_size=8, n_layers_stored=2)
    shallow = plan.plan_corpus(SMALL, calibration, "cpu", **args, deepest_layer=6)
    full = plan.plan_corpus(SMALL, calibration, "cpu", **args)
    assert shallow.work["flops"] == pytest.approx(full.work["flops"] * 7 / 30)
    assert shallow.counted_seconds < 0.3 * full.counted_seconds
    assert full.work == plan.plan_corpus(SMALL, calibration, "cpu", **args, deepest_layer=29).work


def test_answers_of_one_prompt_share_its_prefill(calibration):
    """Two answers per prompt prefill each prompt once: 44 answers of 22 prompts count 22 prompts' tokens."""
    args = dict(n_completions=44, prompt_tokens=56, new_tokens=16, batch_size=16)
    shared = plan.plan_sampling(SMALL, calibration, "cpu", **args, n_per_prompt=2)
    alone = plan.plan_sampling(SMALL, calibration, "cpu", **args)
    assert shared.work["flops"] == 2 * SMALL.n_params * (22 * 56 + 44 * 16)
    assert alone.work["flops"] - shared.work["flops"] == 2 * SMALL.n_params * 22 * 56
    assert shared.work["bytes_read"] == alone.work["bytes_read"]  # the same decoding steps


def test_the_load_rate_is_fitted_over_the_steps_and_a_crowded_plan_is_slower(calibration, monkeypatch):
    """Runs slowed by (runnable threads a core) ** 0.8 at two sizes and two loads: the lines come back to the
    idle machine's, the rate is found, and a plan made with other threads running is slower by that factor;
    before runs at different loads, a crowded plan makes no allowance for load and says so."""
    cores, threads = plan.os.cpu_count(), plan.torch.get_num_threads()
    idle, crowded = 0.0, 4.0 * cores  # 4+ runnable threads a core: crowding log(4 + threads / cores)
    share = (crowded + min(threads, cores)) / cores
    assert (plan.crowding(idle), plan.crowding(crowded)) == (0.0, pytest.approx(math.log(share)))
    for step, fixed, slope in (("probes", 3.0, 2.0), ("explorer", 1.0, 4.0)):
        for counted in (1.0, 4.0):
            for others in (idle, crowded):
                seconds = (fixed + slope * counted) * math.exp(0.8 * plan.crowding(others))
                run = {"counted": counted, "seconds": seconds, "others": others, "threads": threads}
                plan.learn(calibration, step, run)
    assert calibration.load_rate() == pytest.approx(0.8, abs=0.01)
    line = calibration.line("probes")
    assert (line.fixed, line.slope) == (pytest.approx(3.0, abs=0.05), pytest.approx(2.0, abs=0.02))
    assert line.load_fitted and "load rate 0.80" in str(line)
    assert calibration.line("probes", "cpu_seconds") is None  # no CPU time recorded: no CPU-time prediction

    stats = plan.ProbeStats(n_folds=5, n_permutations=99, n_bootstrap=200, feature_permutations=499)
    args = dict(n_completions=200, n_layers=1, sae_widths=[2304], stats=stats)
    monkeypatch.setattr(plan, "others_now", lambda: idle)
    calm = plan.plan_probes(SMALL, calibration, "cpu", **args)
    assert calm.slowdown == 1.0 and "other processes" not in str(calm)
    monkeypatch.setattr(plan, "others_now", lambda: crowded)
    busy = plan.plan_probes(SMALL, calibration, "cpu", **args)
    assert busy.threads == 1  # the other threads take every core: torch on one (`matched_threads`)
    share = (crowded + 1) / cores
    assert busy.seconds == pytest.approx(calm.seconds * share**0.8, rel=0.03)
    assert "other processes are running" in str(busy) and f"x{share**0.8:.2f}" in str(busy)
    assert "fair share" not in str(busy)

    # Runs that all saw one load teach nothing about load: no rate, and a crowded plan says so.
    one_load = plan.Calibration(calibration.rates, "other", calibration.path)
    for counted in (1.0, 4.0):
        plan.learn(one_load, "probes", {"counted": counted, "seconds": 3 + 2 * counted, "others": crowded})
    assert one_load.load_rate() is None and one_load.line("probes").load_rate == 0.0
    unknown = plan.plan_probes(SMALL, one_load, "cpu", **args)
    assert unknown.slowdown == 1.0 and "make no allowance for it" in str(unknown)
    assert unknown.seconds == pytest.approx(3 + 2 * unknown.counted_seconds)  # at the load its runs saw


def test_quiet_runs_are_fitted_as_measured_until_a_load_rate_is_fitted(calibration, monkeypatch):
    """The quiet case of bench/results/planner_cpu_quiet_load_model.json: fit runs with a few transient other
    threads beside them (0.05-0.5, which did not slow them) teach no load rate, so the line goes through
    their times as measured (a fair share's rate 1 divided them by up to 1.2 and shortened the line), and a
    plan made with a transient thread running predicts the same time."""
    threads = plan.torch.get_num_threads()
    for counted, others in ((1.0, 0.05), (4.0, 0.5), (2.0, 0.35)):
        run = {"counted": counted, "seconds": 3 + 2 * counted, "others": others, "threads": threads}
        plan.learn(calibration, "probes", run)
    assert calibration.load_rate() is None
    line = calibration.line("probes")
    assert (line.fixed, line.slope, line.load_rate) == (pytest.approx(3.0), pytest.approx(2.0), 0.0)
    stats = plan.ProbeStats(n_folds=5, n_permutations=99, n_bootstrap=200, feature_permutations=499)
    args = dict(n_completions=200, n_layers=1, sae_widths=[2304], stats=stats)
    monkeypatch.setattr(plan, "others_now", lambda: 0.7)
    quiet = plan.plan_probes(SMALL, calibration, "cpu", **args)
    assert quiet.slowdown == 1.0 and quiet.seconds == pytest.approx(3 + 2 * quiet.counted_seconds)


def test_other_processes_running_threads_are_counted(tmp_path):
    """A process that never sleeps is always ready to run: while it lives, at least one other thread runs,
    and the one sampler thread of a watched step (`PeakMemory`) counts it beside the memory."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.1)
        assert all(plan.others_running() >= 1 for _ in range(20))
        assert OTHERS_NOW(samples=3) >= 1
        threads = threading.active_count()
        with plan.PeakMemory(every=0.01, others_every=0.05) as mem:
            assert threading.active_count() == threads + 1  # one thread takes both readings
            time.sleep(0.3)
        assert len(mem.others_samples) >= 3 and mem.others() >= 1 and mem.peak["total"] > 0
        assert plan.PeakMemory().others() is None  # memory alone: no count taken

        # Sharing one core with it, this thread waits for that core about half the time: the kernel's
        # scheduler statistics say so.
        core = min(plan.os.sched_getaffinity(0))
        allowed = plan.os.sched_getaffinity(0)
        plan.os.sched_setaffinity(spinner.pid, {core})
        plan.os.sched_setaffinity(0, {core})
        try:
            before, began = plan.thread_schedstats(), time.perf_counter()
            while time.perf_counter() - began < 0.3:
                pass
            waited = plan.waited_since(before)
        finally:
            plan.os.sched_setaffinity(0, allowed)
        assert 0.2 * 0.3 <= waited <= time.perf_counter() - began
    finally:
        spinner.kill()
        spinner.wait()
