"""kron.timing and kron.measure against independent truths: a fake clock with known per-call
costs (never the wall clock), allocations of known sizes, and FlopCounterMode for the MAC
closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kron.timing as timing
from kron.measure import (
    conv2d_macs,
    count_macs,
    layer_macs,
    linear_macs,
    measure_latency,
    measure_speed,
    peak_memory,
    speedup,
    surgered_macs,
)
from kron.models.surgery import apply_surgery


class FakeClock:
    """A stand-in for ``time.perf_counter``: advances only when a fake callable says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def work(self, name: str, costs: list[float]):
        """A callable that logs its name and takes the next of ``costs`` seconds (cycling)."""
        calls = iter(range(10**6))

        def run() -> None:
            self.log.append(name)
            self.now += costs[next(calls) % len(costs)]

        return run


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing, "perf_counter", fake)
    return fake


# ----------------------------------------------------------------------------------- timing


def test_rounds_rotate_after_warmup_of_each(clock):
    fns = {n: clock.work(n, [1.0]) for n in "abc"}
    timing.time_callables(fns, warmup=2, repeats=4)
    assert clock.log == [*"aabbcc", *"abc", *"bca", *"cab", *"abc"]


def test_samples_are_each_calls_cost_and_median_is_their_median(clock):
    # warm-up calls consume the first cost of each list: the timed rounds start at the second
    fns = {"slow": clock.work("slow", [9.0, 5.0, 1.0, 3.0]),
           "fast": clock.work("fast", [9.0, 0.5, 0.25, 2.0])}
    samples = timing.time_callables(fns, warmup=1, repeats=3)
    assert samples == {"slow": [5.0, 1.0, 3.0], "fast": [0.5, 0.25, 2.0]}
    fns = {"slow": clock.work("slow", [9.0, 5.0, 1.0, 3.0]),
           "fast": clock.work("fast", [9.0, 0.5, 0.25, 2.0])}
    assert timing.median_times(fns, warmup=1, repeats=3) == {"slow": 3.0, "fast": 0.5}


def test_a_sample_is_the_mean_of_number_back_to_back_calls(clock):
    fns = {"a": clock.work("a", [1.0, 3.0, 8.0]), "b": clock.work("b", [2.0])}
    samples = timing.time_callables(fns, warmup=0, repeats=2, number=3)
    assert samples == {"a": [4.0, 4.0], "b": [2.0, 2.0]}
    assert clock.log == [*"aaabbb", *"bbbaaa"]
    with pytest.raises(ValueError, match="number >= 1"):
        timing.time_callables(fns, number=0)


def test_cuda_calls_are_timed_by_events_on_a_drained_queue(clock, monkeypatch):
    """The CUDA path without a GPU: fake events read the fake clock when recorded; the host
    timer must not be used, and the queue is drained before every timed call."""
    syncs: list[int] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.t: float | None = None

        def record(self) -> None:
            self.t = clock.now

        def elapsed_time(self, end: FakeEvent) -> float:
            assert syncs, "events read before any synchronisation"
            return (end.t - self.t) * 1e3  # milliseconds, as CUDA events report

    def no_host_timer() -> float:
        raise AssertionError("perf_counter used on CUDA")

    monkeypatch.setattr(timing, "perf_counter", no_host_timer)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(len(clock.log)))
    fns = {"a": clock.work("a", [0.002, 0.004]), "b": clock.work("b", [0.001])}
    samples = timing.time_callables(fns, device="cuda", warmup=0, repeats=3)
    assert samples == {"a": pytest.approx([0.002, 0.004, 0.002]),
                       "b": pytest.approx([0.001] * 3)}
    # one drain before each of the 6 calls, one after each of the 3 rounds
    assert syncs == [0, 1, 2, 2, 3, 4, 4, 5, 6]
    fns = {"a": clock.work("a", [0.002, 0.004])}
    assert timing.time_callables(fns, device="cuda", warmup=0, repeats=1, number=2) == {
        "a": pytest.approx([0.003])}
    assert timing.timer_name("cuda") == "cuda_events" and timing.timer_name("cpu") == "perf_counter"


def test_time_callables_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats >= 1"):
        timing.time_callables({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="at least one callable"):
        timing.time_callables({})


class Costly(nn.Module):
    """A module whose forward takes ``fixed + per_sample * batch`` seconds of the fake clock
    and records the mode and autocast state it ran in."""

    def __init__(self, clock: FakeClock, fixed: float, per_sample: float) -> None:
        super().__init__()
        self.clock, self.fixed, self.per_sample = clock, fixed, per_sample
        self.seen: set[tuple] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.fixed + self.per_sample * x.shape[0]
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.seen.add((self.training, torch.is_grad_enabled(), autocast))
        return x


def test_measure_latency_reports_milliseconds_in_eval_and_restores_modes(clock):
    kron, dense = Costly(clock, 0.002, 0.0), Costly(clock, 0.005, 0.0)
    times = measure_latency({"kron": kron, "dense": dense}, torch.zeros(4, 3), repeats=3)
    assert times == {"kron": pytest.approx(2.0), "dense": pytest.approx(5.0)}
    assert speedup(times["kron"], times["dense"]) == pytest.approx(2.5)
    assert kron.seen == dense.seen == {(False, False, None)}  # eval, no grad, no autocast
    assert kron.training and dense.training  # modes restored


def test_measure_speed_latency_and_throughput_with_dtype(clock):
    model, dense = Costly(clock, 1e-3, 1e-5), Costly(clock, 2e-3, 5e-5)
    out = measure_speed(model, dense, (3, 2, 2), "cpu", torch.bfloat16, latency_batch=10,
                        throughput_batch=1000, warmup=1, repeats=3)
    assert out["latency_ms"] == pytest.approx(1.1) and out["latency_dense_ms"] == pytest.approx(2.5)
    assert out["speedup"] == pytest.approx(2.5 / 1.1)
    assert out["throughput_img_s"] == pytest.approx(1000 / 0.011)
    assert out["throughput_dense_img_s"] == pytest.approx(1000 / 0.052)
    assert out["throughput_speedup"] == pytest.approx(0.052 / 0.011)
    assert (out["latency_batch_size"], out["throughput_batch_size"]) == (10, 1000)
    assert (out["latency_dtype"], out["latency_device"], out["latency_timer"]) == (
        "bfloat16", "cpu", "perf_counter")
    assert model.seen == {(False, False, torch.bfloat16)}  # run under bf16 autocast
    without = measure_speed(model, dense, (3,), "cpu", latency_batch=2, warmup=0, repeats=1)
    assert without["latency_dtype"] == "float32" and without["latency_batch_size"] == 2
    empty = ("throughput_batch_size", "throughput_img_s", "throughput_dense_img_s",
             "throughput_speedup")
    assert {k: without[k] for k in empty} == dict.fromkeys(empty)
    assert without["latency_threads"] == torch.get_num_threads()


def test_measure_speed_feeds_channels_last_batches_when_asked(clock):
    class Layout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layouts: set[bool] = set()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            clock.now += 1e-3
            self.layouts.add(x.is_contiguous(memory_format=torch.channels_last)
                             and not x.is_contiguous())
            return x

    model, dense = Layout(), Layout()
    measure_speed(model, dense, (3, 4, 4), "cpu", latency_batch=2, throughput_batch=4,
                  warmup=0, repeats=1, channels_last=True)
    assert model.layouts == dense.layouts == {True}
    model.layouts.clear()
    measure_speed(model, dense, (3, 4, 4), "cpu", latency_batch=2, warmup=0, repeats=1)
    assert model.layouts == {False}


# ----------------------------------------------------------------------------- peak memory


def test_peak_memory_of_known_allocations():
    def temp_then_result() -> torch.Tensor:
        result = torch.empty(1000)  # 4,000 bytes, returned
        temp = torch.empty(250_000)  # 1,000,000 bytes, freed before the next allocation
        del temp
        torch.empty(100_000)  # 400,000 bytes, freed at once
        return result

    mem = peak_memory(temp_then_result)
    assert (mem.peak, mem.output, mem.workspace) == (1_004_000, 4_000, 1_000_000)
    assert peak_memory(lambda: torch.empty(10, dtype=torch.float64)).peak == 80


def test_peak_memory_of_a_linear_forward_is_its_output():
    layer, x = nn.Linear(256, 128), torch.randn(16, 256)
    with torch.no_grad():
        mem = peak_memory(lambda: layer(x))
    assert mem.peak == mem.output == 16 * 128 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_on_cuda():
    mem = peak_memory(lambda: torch.empty(1 << 20, device="cuda"), "cuda")
    assert mem.output == 4 << 20 and mem.peak == 4 << 20


# -------------------------------------------------------------------------------------- MACs


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 11, 9)),
    (nn.Conv2d(8, 12, (3, 2), dilation=(2, 1), padding=(0, 3)), (1, 8, 10, 7)),
    (nn.Conv2d(8, 12, 3, groups=4, padding=1), (2, 8, 6, 6)),
    (nn.Conv2d(8, 8, 3, groups=8, padding="same"), (1, 8, 7, 5)),
    (nn.Conv2d(8, 4, 5, padding="valid"), (1, 8, 9, 9)),
], ids=["strided", "dilated", "groups", "same", "valid"])
def test_conv_closed_form_equals_flop_counter(conv, shape):
    counted = count_macs(conv, shape)
    assert conv2d_macs(shape, conv.weight.shape, conv.stride, conv.padding, conv.dilation) \
        == counted
    assert layer_macs(conv, shape) == counted


def test_linear_closed_form_equals_flop_counter_and_hand_count():
    assert linear_macs((3, 5, 64), 64, 32) == count_macs(nn.Linear(64, 32), (3, 5, 64)) \
        == 3 * 5 * 64 * 32


def test_surgery_counts_grouped_convs_as_they_run():
    """A grouped conv kept dense by surgery: its MACs are what runs, not 1/groups of it."""
    net = nn.Sequential(nn.Conv2d(8, 16, 3, groups=4, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 6 * 6, 10))
    rows = apply_surgery(net, {"0": {"kind": "dense"}, "3": {"kind": "dense"}}, (1, 8, 6, 6))
    assert [r.macs_before for r in rows] == [16 * 2 * 9 * 36, 576 * 10]  # by hand
    assert sum(r.macs_before for r in rows) == count_macs(net, (1, 8, 6, 6))


def test_surgered_macs_subtracts_what_each_layer_saved():
    rows = [{"macs_before": 1000, "macs_after": 100}, {"macs_before": 50, "macs_after": 50}]
    assert surgered_macs(5000, rows) == 4100
    assert surgered_macs(5000, []) == 5000


def test_training_step_returns_the_gradients_of_its_inputs():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor([3.0, -1.0], requires_grad=True)
    gx, gw = timing.training_step(lambda: x * w, [x, w])()  # upstream gradient of ones
    assert gx.tolist() == [3.0, -1.0] and gw.tolist() == [1.0, 2.0]
