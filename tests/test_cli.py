import json
import subprocess
import sys

from treeq_engine.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"cxx_core", "cuda_built", "cuda_archs", "triton", "cuda_device_count", "diffusers"} <= set(info)
    import importlib.util

    if importlib.util.find_spec("diffusers") is not None:   # which of its transformers get what
        assert "SD3, Flux, Wan, Qwen-Image, Sana, Z-Image, FLUX.2, LTX-Video, Chroma searched, calibrated and " \
            "fused" in info["diffusers"]
    else:
        assert info["diffusers"] is None


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "selfcheck" in capsys.readouterr().out


def test_module_entry_point_selfcheck():
    r = subprocess.run([sys.executable, "-m", "treeq_engine", "selfcheck"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "selfcheck: PASS" in r.stdout
