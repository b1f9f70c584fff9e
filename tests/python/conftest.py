"""pytest hooks of the Python tests: after a run of test_gpu.py, a table of where the time went
(each case on the GPU processes: wall time, and the slowest rank's inputs / epcomm / verify /
buffer-creation seconds), whatever the capture mode."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_terminal_summary(terminalreporter):
    cluster = sys.modules.get("_cluster")
    timings = getattr(cluster, "TIMINGS", None)
    if not timings:
        return
    phases = ("inputs", "epcomm", "verify", "gather", "buffers")
    terminalreporter.section("epcomm GPU case timings (seconds; phases: slowest rank, gather is part of verify)")
    terminalreporter.write_line(f"{'wall':>7} {'case':>7}" + "".join(f"{p:>8}" for p in phases) + "  what")
    total = 0.0
    for what, wall, times in timings:
        total += wall
        cells = "".join(f"{times[p]:8.2f}" if p in times else f"{'':>8}" for p in phases)
        case = f"{times['case']:7.2f}" if "case" in times else f"{'':>7}"
        terminalreporter.write_line(f"{wall:7.2f} {case}{cells}  {what}")
    terminalreporter.write_line(f"{total:7.2f} in all ({len(timings)} runs)")
