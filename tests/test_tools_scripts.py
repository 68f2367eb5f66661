"""The GPU runbook script parses, names its stages, and refers only to scripts and flags that exist (its steps
themselves need a GPU)."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_session.sh"


def test_gpu_session_parses_and_rejects_unknown_stages(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "test", "warp-drive"], capture_output=True, text=True,
                       env={"OUT": str(tmp_path / "out"), "STATE": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "unknown stage warp-drive" in r.stderr
    # nothing ran, and what comes back is there anyway: the summary and the packed logs
    assert (tmp_path / "out" / "summary.tsv").read_text() == "step\trc\tseconds\n"
    assert (tmp_path / "out" / "logs.tar.gz").exists()


def test_gpu_session_deadline_skips_steps(tmp_path):
    """A step that would get under 20 s before the deadline is recorded as skipped, not started."""
    env = {"OUT": str(tmp_path / "out"), "STATE": str(tmp_path / "state"), "PATH": "/usr/bin:/bin",
           "DEADLINE_S": "10", "PYTHON": "false"}
    r = subprocess.run(["bash", str(SCRIPT), "search"], capture_output=True, text=True, env=env)
    summary = (tmp_path / "out" / "summary.tsv").read_text()
    assert r.returncode == 0 and "bench_search\tskipped" in summary, (r.stdout, r.stderr, summary)
    assert len(list((tmp_path / "out").iterdir())) <= 8  # the device returns at most 8 files


def test_gpu_session_steps_exist():
    text = SCRIPT.read_text()
    for script in set(re.findall(r"(benchmarks/\w+\.py|tools/\w+\.sh)", text)):
        assert (ROOT / script).exists(), script
    for script, flag in re.findall(r"(benchmarks/\w+\.py) (--[\w-]+)", text):
        assert flag in (ROOT / script).read_text(), (script, flag)


def test_check_cuda_reads_sass():
    """The SASS report counts tensor-core and local-memory instructions per kernel and finds a spill inside the
    main loop (between the first and last integer MMA), on a hand-written listing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_cuda", ROOT / "tools" / "check_cuda.py")
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    sass = """
\t\tFunction : _ZN5treeq4gemm16gemm_sm90_kernelILi4EEEvNS0_6ParamsE
        /*0000*/                   STL [R1], R2 ;
        /*0010*/                   IGMMA.64x128x32.U8.S8 R88, R180, gdesc[UR16], R88 ;
        /*0020*/               @P0 LDL.LU R3, [R1+0x4] ;
        /*0030*/                   IGMMA.64x128x32.U8.S8 R24, R176, gdesc[UR20], R24, gsb0 ;
        /*0040*/                   HMMA.16816.F32.BF16 R144, R148, R186, R144 ;
        /*0050*/                   EXIT ;
\t\tFunction : _ZN5treeq4cuda12z_pad_kernelEPtiiiii
        /*0000*/                   STL [R1], R2 ;
        /*0010*/                   EXIT ;
"""
    k = cc.sass_kernels(sass)
    gemm = k["_ZN5treeq4gemm16gemm_sm90_kernelILi4EEEvNS0_6ParamsE"]
    assert (gemm["IGMMA"], gemm["HMMA"], gemm["STL"], gemm["LDL"], gemm["local_in_main_loop"]) == (2, 1, 1, 1, 1)
    pad = k["_ZN5treeq4cuda12z_pad_kernelEPtiiiii"]
    assert pad["STL"] == 1 and pad["local_in_main_loop"] == 0
    assert cc.short_name("_ZN5treeq4gemm16gemm_sm90_kernelILi4EEEvNS0_6ParamsE") == "gemm_sm90_kernel<4>"


def test_gpu_session_runs_every_gpu_test_file():
    """The GPU stage names its test files (priority order); every file with a `gpu` mark must be among them."""
    mark = re.compile(r"^\s*(@pytest\.mark\.gpu|pytestmark = \[?pytest\.mark\.gpu)", re.M)
    marked = {p.name for p in (ROOT / "tests").glob("test_*.py") if mark.search(p.read_text())}
    named = set(re.findall(r"tests/(test_\w+\.py)", SCRIPT.read_text()))
    assert marked and marked <= named, marked - named
