"""experiments/ncu_profile: its case syntax and the summaries of ncu's CSV reports (the reports
here are written by the test in ncu's column layout, with known values)."""

import csv
import io

import pytest

from experiments import ncu_profile as nc


def test_case_syntax_overrides_config_fields():
    assert nc.parse_case("w4g128t:57344x8192:1") == ("w4g128t", 57344, 8192, 1, {})
    fmt, n, k, m, fields = nc.parse_case("nf4t:8192x28672:128:stages=2,lut=1:fused=0")
    assert (fmt, n, k, m) == ("nf4t", 8192, 28672, 128)
    assert fields == {"stages": 2, "lut": 1, "fused": 0}
    with pytest.raises(ValueError):
        nc.parse_case("w4g128t:8192:1")


def _csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def test_details_summary_keeps_every_metric_per_kernel_first_value_wins():
    head = ["ID", "Kernel Name", "Block Size", "Grid Size", "Section Name", "Metric Name",
            "Metric Unit", "Metric Value"]  # fmt: skip
    rows = [
        ["1", "kernel_mosaic_gpu_kernel", "(384, 1, 1)", "(1, 128, 1)", "SOL", "Duration", "ns",
         "31,168"],
        ["1", "kernel_mosaic_gpu_kernel", "(384, 1, 1)", "(1, 128, 1)", "SOL", "Duration", "ns",
         "99"],
        ["0", "kernel_mosaic_gpu_kernel", "(384, 1, 1)", "(16, 8, 1)", "SOL", "DRAM Throughput",
         "%", "78.52"],
        ["0", "kernel_mosaic_gpu_kernel", "(384, 1, 1)", "(16, 8, 1)", "SOL", "", "", ""],
    ]  # fmt: skip
    text = "==PROF== Connected to process 1\n" + _csv(head, rows) + "==PROF== Disconnected\n"
    got = nc.summarize(text)
    assert [d["id"] for d in got] == [0, 1] and got[0]["grid"] == "(16, 8, 1)"
    assert got[0]["SOL: DRAM Throughput"] == "78.52 %"
    assert got[1]["SOL: Duration"] == "31,168 ns"
    assert set(got[0]) == {"id", "kernel", "grid", "block", "SOL: DRAM Throughput"}


def test_source_summary_finds_the_k_step_loop_by_its_wgmma_count():
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
            "stall_wait", "stall_long_sb", "stall_wait (Not Issued)"]  # fmt: skip
    rows = [
        ["0x10", "LDC R1, c[0x0][0x28]", "5", "384", "0", "5", "0"],  # prologue
        ["0x20", "@!P2  BRA 0x40", "30", "4096", "0", "30", "0"],  # the loop: 4096 trips
        ["0x30", "PRMT R4, R5, 0xf4f0, R6", "10", "4096", "10", "0", "7"],
        ["0x40", "HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR16], R24", "20", "4096", "20", "0",
         "0"],
        ["0x50", "HGMMA.64x128x16.F32.BF16 R24, R92, gdesc[UR16], R24", "0", "8192", "0", "0",
         "0"],  # executed more often: not the fewest-executed wgmma
        ["0x60", "EXIT", "35", "384", "35", "0", "0"],
    ]  # fmt: skip
    text = '"Kernel Name","kernel_mosaic_gpu_kernel",\n' + _csv(head, rows)
    got = nc.summarize_source(text, top=2)
    assert got["loop_trips"] == 4096 and got["loop_instructions_per_trip"] == 3
    assert got["loop_by_opcode"] == {"BRA": [1, 30], "PRMT": [1, 10], "HGMMA": [1, 20]}
    assert got["loop_samples_pct"] == 60.0  # 60 of 100 samples
    assert got["stalls_in_loop_pct"] == {"long_sb": 50.0, "wait": 50.0}
    assert got["stalls_outside_loop_pct"] == {"wait": 87.5, "long_sb": 12.5}
    assert [t[0] for t in got["top_instructions"]] == ["EXIT", "@!P2  BRA 0x40"]
