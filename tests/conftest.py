"""Fixtures and hooks of the fusedrnn test suite; the helpers the tests share (tolerance rule,
layer cases, weights, module comparison) are in fusedrnn/testing.py.

Everything here is deterministic: every test starts from a seed derived from its own node id,
so a failure reproduces when the test is run alone.
"""

import zlib

import pytest
import torch

# the helpers' assertions get pytest's rewriting when they fail, as the tests' own do
pytest.register_assert_rewrite("fusedrnn.testing")
from fusedrnn.testing import ISAS, isas_of_cpu  # noqa: E402

# bench/README.md (protocol, threads): on these 2-core machines OpenMP's spin-wait makes two-thread
# small GEMMs ~30x slower than one thread. The suite runs single-threaded to stay fast; the
# multi-threaded code path (parallel_for over the rows of a step) has its own test that raises the
# thread count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch's global RNG from the test's node id: reproducible and distinct per test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


_ISA_RUNS = {"collected": set(), "passed": set()}


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Runs the test with the library's CPU kernels switched to one ISA, then restores it."""
    isa = request.param
    _ISA_RUNS["collected"].add(isa)
    if isa not in isas_of_cpu():
        pytest.skip(f"this CPU has no {isa} (it has {', '.join(isas_of_cpu())})")
    ops = torch.ops.fusedrnn
    previous = ops._set_cpu_isa(isa)
    try:
        assert ops.cpu_isa() == isa
        yield isa
    finally:
        ops._set_cpu_isa(previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed and "cpu_isa" in item.fixturenames:
        _ISA_RUNS["passed"].add(item.callspec.params.get("cpu_isa"))


def pytest_sessionfinish(session, exitstatus):
    """Fails the session when the ISA-parametrised tests ran but none passed under an ISA this
    CPU has: the suite must have tested every ISA's kernels, at least baseline and AVX2 on any
    machine that has AVX2."""
    if not _ISA_RUNS["collected"] or exitstatus != 0:
        return
    missing = [
        isa
        for isa in isas_of_cpu()
        if isa in _ISA_RUNS["collected"] and isa not in _ISA_RUNS["passed"]
    ]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if missing:
        if reporter:
            reporter.write_line(
                f"fusedrnn: no ISA-parametrised test passed under {missing}, which this CPU has",
                red=True,
            )
        session.exitstatus = 1
    elif reporter:
        reporter.write_line(
            "fusedrnn: CPU kernels tested under ISAs: "
            + ", ".join(i for i in ISAS if i in _ISA_RUNS["passed"])
        )
