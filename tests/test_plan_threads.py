"""torch's threads matched to the cores other processes leave free (helpers/plan.py `matched_threads`): a plan
chooses the count from the other running threads it sees, `watch` sets it and `done` restores the user's
count, the user's count is the upper bound, and a dedicated machine (no other running threads) sees no
change. The other running threads and the core count are faked (`others_now`, `os.cpu_count`); the maths
is the module's."""

from __future__ import annotations

import pytest

from helpers import plan

SMALL = plan.ModelNumbers(135_000_000, 30, 576, 49_152, 192, 4, "llama")


@pytest.fixture(autouse=True)
def user_threads():
    """The user's torch thread count put back after each test, and no step left half-watched."""
    before = plan.torch.get_num_threads()
    yield
    plan.torch.set_num_threads(before)
    plan._lowered = None


@pytest.fixture
def machine(monkeypatch):
    """A machine of 4 cores; `machine(others)` sets the other processes' running threads a plan sees."""
    monkeypatch.setattr(plan.os, "cpu_count", lambda: 4)

    def others(value: float | None) -> None:
        monkeypatch.setattr(plan, "others_now", lambda *_, **__: value)

    others(0.0)
    return others


@pytest.fixture
def calibration(tmp_path):
    """Rates given by hand (not measured here): they stand for every thread count, so nothing is measured."""
    rates = plan.Rates(1e11, 1e11, 1e10, "fixed for the test")
    return plan.Calibration(rates, "test hardware", tmp_path / "calibration.json")


def corpus_plan(calibration) -> plan.Plan:
    return plan.plan_corpus(
        SMALL, calibration, "cpu", tokens=4096, seq_len=64, batch_size=8, n_layers_stored=1
    )


def test_the_thread_count_follows_the_other_running_threads(machine, calibration):
    plan.torch.set_num_threads(4)
    got = {}
    for others in (0.0, 0.4, 1.0, 1.6, 2.4, 3.0, 7.5):
        machine(others)
        got[others] = corpus_plan(calibration).threads
    # cores - round(others), at least 1: 4 cores, 4 torch threads.
    assert got == {0.0: 4, 0.4: 4, 1.0: 3, 1.6: 2, 2.4: 2, 3.0: 1, 7.5: 1}
    machine(None)  # not Linux: no count, no change
    assert corpus_plan(calibration).threads == 4


def test_a_watched_step_runs_on_the_matched_threads_and_restores_the_users(machine, calibration, tmp_path):
    plan.torch.set_num_threads(3)
    machine(2.0)
    p = corpus_plan(calibration)
    assert p.threads == 2 and "torch runs this step on 2 of its 3 threads" in str(p)
    assert plan.torch.get_num_threads() == 3  # the plan alone changes nothing
    watching = plan.watch(tmp_path, p, calibration, "cpu")
    assert plan.torch.get_num_threads() == 2
    assert plan.hardware_key("cpu").count("| 3 threads |") == 1  # the key keeps the user's count
    record = watching.done(quiet=True)
    assert plan.torch.get_num_threads() == 3
    assert record["threads"] == 2 and calibration.runs["corpus"][-1]["threads"] == 2

    # A step that raised before its done() leaves torch on 2; the next plan is still bounded by the user's 3.
    machine(1.0)
    plan.watch(tmp_path, p, calibration, "cpu")
    assert plan.torch.get_num_threads() == 2
    again = corpus_plan(calibration)
    assert again.threads == 3 and plan.threads_bound() == 3
    watching = plan.watch(tmp_path, again, calibration, "cpu")
    watching.done(quiet=True)
    assert plan.torch.get_num_threads() == 3


def test_the_users_thread_count_bounds_the_matched_count(machine, calibration, tmp_path):
    plan.torch.set_num_threads(1)  # the user asked for one thread: 3 free cores do not raise it
    machine(1.0)
    p = corpus_plan(calibration)
    assert p.threads == 1 and "torch runs this step" not in str(p)

    plan.torch.set_num_threads(2)
    machine(3.0)
    watching = plan.watch(tmp_path, corpus_plan(calibration), calibration, "cpu")
    assert plan.torch.get_num_threads() == 1
    plan.torch.set_num_threads(2)  # the user sets a count during the step: done() leaves it
    watching.done(quiet=True)
    assert plan.torch.get_num_threads() == 2 and plan.threads_bound() == 2


def test_a_dedicated_machine_sees_no_change(machine, calibration, tmp_path):
    plan.torch.set_num_threads(6)  # more threads than the 4 cores, as the user set them: kept
    key = plan.hardware_key("cpu")
    p = corpus_plan(calibration)
    assert p.threads == 6 and "threads:" not in str(p)
    watching = plan.watch(tmp_path, p, calibration, "cpu")
    assert plan.torch.get_num_threads() == 6
    watching.done(quiet=True)
    assert plan.torch.get_num_threads() == 6 and plan.hardware_key("cpu") == key


def test_a_step_on_fewer_threads_is_counted_at_their_rates(machine, tmp_path, monkeypatch):
    """Rates measured here are per thread count: a step on 1 thread counts its FLOPs at the 1-thread rate,
    cached beside the key's rates (here given, so nothing is measured) and read back by `calibrate`."""
    plan.torch.set_num_threads(2)
    monkeypatch.delenv("NB_PLAN_CALIBRATION", raising=False)
    path = plan.calibration_path(tmp_path)
    measured = plan.Rates(2e10, 2e10, 1e10, "measured on this cpu", 1e-6)
    one = plan.Rates(1e10, 1e10, 1e10, "measured on this cpu", 1e-6)
    key = plan.hardware_key("cpu")
    entry = {"rates": plan.asdict(measured), "counts_version": plan.COUNTS_VERSION, "runs": {}}
    plan._write_entry(path, key, entry | {"thread_rates": {"1": plan.asdict(one)}})
    calibration = plan.calibrate("cpu", tmp_path)
    assert not calibration.measured_now
    assert calibration.rates_for(1) == one and calibration.rates_for(2) == measured
    work = plan.Work(flops=1e10, bytes_read=0, device_bytes=0, host_bytes=0, disk_bytes=0, ops=0)
    counted = {}
    for others in (0.0, 3.0):
        machine(others)
        p = plan.make_plan("probes", work, work, SMALL, calibration, "cpu", {})
        counted[p.threads] = p.counted_seconds
    assert counted == {2: pytest.approx(0.5), 1: pytest.approx(1.0)}


def test_rates_measured_while_the_threads_had_no_free_cores_are_measured_again_once_they_have(
    machine, tmp_path, monkeypatch
):
    """2-thread rates cached while 3 other threads ran on the 4 cores (one core free: the threads stalled) are
    measured again by the first plan that finds 2 cores free, and the new ones cached; rates measured with
    their cores free are kept."""
    plan.torch.set_num_threads(2)
    stalled = plan.Rates(1e10, 1e10, 1e10, "measured on this cpu", 1e-6, others=3.0)
    fresh = plan.Rates(4e10, 4e10, 1e10, "measured on this cpu", 1e-6, others=0.0)
    measured = []
    monkeypatch.setattr(plan, "machine_rates", lambda device: measured.append(device) or fresh)
    path = tmp_path / "calibration.json"
    calibration = plan.Calibration(stalled, "test hardware", path)
    plan._write_entry(path, "test hardware", {"rates": plan.asdict(stalled), "runs": {}})
    assert calibration.rates_for(2, others=3.0) == stalled and measured == []  # still crowded: kept
    assert calibration.rates_for(2, others=1.0) == fresh and measured == ["cpu"]
    assert calibration.rates == fresh
    assert plan.json.loads(path.read_text())["test hardware"]["rates"] == plan.asdict(fresh)
    assert calibration.rates_for(2, others=0.0) == fresh and measured == ["cpu"]  # measured free: kept


def test_a_plan_fits_its_line_on_the_runs_at_its_thread_count(machine, calibration):
    """Runs of one step on 2 threads (idle) and on 1 (beside a busy process) were counted at different rates,
    so the same work counts ~2x apart: a line through all of them would take that for two sizes. A plan on
    1 thread fits the 1-thread runs, a plan on 2 threads the 2-thread runs; a count with no runs, all."""
    plan.torch.set_num_threads(2)
    # the same two sizes on each count: 2 threads take 1.5 x counted, 1 thread 3 s + 1 x counted
    for counted in (0.5, 4.0):
        plan.learn(calibration, "corpus", {"counted": counted, "seconds": 1.5 * counted, "threads": 2})
        plan.learn(calibration, "corpus", {"counted": 2 * counted, "seconds": 3 + 2 * counted, "threads": 1})
    one, two = calibration.line("corpus", threads=1), calibration.line("corpus", threads=2)
    assert (one.fixed, one.slope, one.runs) == (pytest.approx(3), pytest.approx(1), 2)
    assert (two.fixed, two.slope, two.runs) == (pytest.approx(0, abs=1e-9), pytest.approx(1.5), 2)
    assert calibration.line("corpus", threads=3).runs == 4
    machine(3.0)  # 3 other threads on 4 cores leave 1 free
    p = corpus_plan(calibration)
    assert p.threads == 1 and p.seconds == pytest.approx(3 + 1 * p.counted_seconds)
