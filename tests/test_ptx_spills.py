"""benchmarks/ptx_spills.py: spill instructions counted by source line in nvdisasm's output, those before the main
loop (its longest backward branch) apart, and ptxas's report read; the whole path on a real PTX file where ptxas and
nvdisasm are installed."""
import pytest

from benchmarks import ptx_spills

# nvdisasm -g -c's format: line-table comments, labels, /*address*/ instructions. .L_x_1 .. 0x60 is the main loop,
# .L_x_2 a wait loop inside it.
SASS = """\
	//## File "/src/kernel.py", line 10
        /*0010*/                   STL [R1+0x4], R7 ;
.L_x_1:
	//## File "/src/kernel.py", line 12
        /*0020*/                   LDL R7, [R1+0x4] ;
        /*0030*/                   STL [R1+0x8], R9 ;
.L_x_2:
        /*0040*/              @!P1 BRA `(.L_x_2) ;
	//## File "/src/kernel.py", line 14
        /*0050*/                   LDL.64 R8, [R1+0x8] ;
        /*0060*/               @P0 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""


def test_spills_are_counted_by_line_and_the_hoisted_ones_apart():
  rows = ptx_spills.spills_by_line(SASS)
  got = [(row.line, row.stores, row.stores_before_loop, row.loads, row.first_address) for row in rows]
  assert got == [(10, 1, 1, 0, 0x10), (12, 1, 0, 1, 0x20), (14, 0, 0, 1, 0x50)]


def test_the_main_loop_is_the_longest_backward_branch():
  lines = SASS.splitlines()
  first, last = ptx_spills.main_loop(SASS)
  assert lines[first] == ".L_x_1:" and "BRA `(.L_x_1)" in lines[last]
  assert ptx_spills.main_loop("        /*0010*/                   EXIT ;") is None


def test_ptxas_report_is_read():
  text = ("ptxas info    : Function properties for k\n    464 bytes stack frame, 460 bytes spill stores, 464 bytes "
          "spill loads\nptxas info    : Used 128 registers, used 16 barriers")
  assert ptx_spills.ptxas_report(text) == {"registers": 128, "spill_store_bytes": 460, "spill_load_bytes": 464,
                                           "stack_frame_bytes": 464}
  assert ptx_spills.ptxas_report("ptxas info    : Used 40 registers")["spill_store_bytes"] == 0


@pytest.mark.skipif(ptx_spills.find_tool("ptxas") is None or ptx_spills.find_tool("nvdisasm") is None,
                    reason="needs ptxas and nvdisasm (a CUDA toolkit or the nvidia-cuda-nvcc/-nvdisasm wheels)")
def test_a_ptx_file_is_assembled_and_read(tmp_path):
  ptx = tmp_path / "k.ptx"
  ptx.write_text(".version 8.0\n.target sm_90a\n.address_size 64\n.visible .entry k()\n{\n  ret;\n}\n")
  report, sass = ptx_spills.assemble(str(ptx))
  assert report["spill_store_bytes"] == 0 and "EXIT" in sass
  assert ptx_spills.spills_by_line(sass) == []
