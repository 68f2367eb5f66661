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


def test_option_refusals_found_by_a_cli_review(tmp_path):
    """One line each, before any work: a --device torch does not know, non-positive counts, W16 with quantized
    activations where no packed layer runs it, an --out holding another command's plan, an AOT filter matching
    nothing; and the command's name said once."""
    from cli_refusal import refused

    refused(r"^treeq search: error: --device 'foo' is not a torch device", ["search", "--budget", "W4A4",
                                                                            "--device", "foo"])
    refused(r"--device 'tpu' is not a torch device", ["sample", "--labels", "1", "--device", "tpu"])
    for flag in ("--keep", "--batch", "--group", "--random-plans", "--serve-batch"):
        refused(f"{flag} must be positive, got 0", ["search", "--budget", "W4A4", flag, "0"])
    refused(r"--threads must be >= 1, got -2", ["sample", "--labels", "1", "--threads", "-2"])
    refused(r"W16A4 has 16-bit weights with quantized activations", ["demo", "--configs", "W16A4"])
    refused(r"--formats: W16A4 has 16-bit weights", ["profile", "--formats", "W16A4", "--device", "cpu", "--out",
                                                   str(tmp_path / "lut.json")])
    out = tmp_path / "ptq"
    out.mkdir()
    (out / "ptq.json").write_text("{}")
    refused(r"--out .* holds another command's output \(ptq.json\)", ["search", "--budget", "W4A4", "--out",
                                                                      str(out)])
    searched = tmp_path / "searched"
    searched.mkdir()
    (searched / "plan.json").write_text("{}")
    refused(r"holds a plan.json that is not a ptq run's", ["ptq", "--plan", str(searched / "plan.json"), "--out",
                                                           str(searched)])
    line = refused(r"--threads must be >= 1", ["demo", "--threads", "0"])
    assert line.count("treeq demo:") == 1, line
    refused(r"--filter 'zzzz' matches no kernel", ["triton-aot", "--filter", "zzzz"])


def test_output_paths_checked_before_the_work(tmp_path):
    """sample, profile and capture refuse an --out they could not write before sampling, profiling or running the
    pipeline (they failed after it)."""
    from cli_refusal import refused

    refused(r"--out .*: a directory; name an image file", ["sample", "--labels", "1", "--out", str(tmp_path)])
    refused(r"\.txt is no image type; write a \.png", ["sample", "--labels", "1", "--out", str(tmp_path / "s.txt")])
    refused(r"no extension is no image type", ["sample", "--labels", "1", "--out", str(tmp_path / "noext")])
    refused(r"--out .* is a directory; the latency table is a JSON file",
            ["profile", "--formats", "W4A8", "--tokens", "4", "--device", "cpu", "--out", str(tmp_path)])
